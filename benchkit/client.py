"""The benchmark client's requests: the protocols, one timed request, and a run of C clients keeping C requests in
flight (bench.py is its command line; docs/bench-client.md says what it measures).

Talks to this server's `/infer` and `/generate`, and to any OpenAI-compatible `/v1/completions` or
`/v1/chat/completions` (this server, vLLM, `transformers serve`). Streamed answers are timed chunk by chunk, so that
time to first token, time per output token and inter-token latency are measured as the client sees them. Only the
standard library on the request path: nothing of the client's own should weigh on what it measures.
"""

from __future__ import annotations

import http.client
import itertools
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from benchkit.load import Clients

# ---------------------------------------------------------------------------------------------------------------
# Protocols: the route, the request body, and how the streamed answer is read.


class StreamError(Exception):
    """The server reported an error inside a stream whose status was already 200."""


@dataclass(frozen=True)
class Chunk:
    text: str
    usage: dict | None = None


def ndjson_chunks(response) -> Iterator[Chunk]:
    """/infer with "stream": true: one JSON object per line; an error is a line with "error"."""
    for line in response:
        if line.strip():
            event = json.loads(line)
            if "error" in event:
                raise StreamError(error_message(event))
            yield Chunk(event.get("text") or "")


def text_chunks(response) -> Iterator[Chunk]:
    """/generate?streaming=true: plain text as it is produced (an error just ends the text early)."""
    while data := response.read1(65536):
        yield Chunk(data.decode("utf-8", errors="replace"))


def sse_chunks(response) -> Iterator[Chunk]:
    """OpenAI server-sent events, completions (`text`) or chat (`delta.content`), ending with [DONE]."""
    for line in response:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise StreamError(error_message(event))
        choice = event["choices"][0] if event.get("choices") else {}
        yield Chunk(choice.get("text") or (choice.get("delta") or {}).get("content") or "", event.get("usage"))


def _greedy_fixed_length(length: int) -> dict:
    # Special tokens stay in the text: a random-weight model can generate nothing else for a whole answer, which
    # would read as an answer without text; on the native routes re-tokenizing the text then counts them too.
    return {"temperature": 0, "max_tokens": length, "ignore_eos": True, "skip_special_tokens": False}


def _openai_stream(body: dict, model: str | None) -> dict:
    # include_usage: the server's own token count; servers that always send usage just ignore it.
    return {**({"model": model} if model else {}), **body, "stream": True, "stream_options": {"include_usage": True}}


def _hf_fixed_length(length: int) -> dict:
    # `transformers serve` (checked in transformers 5.19) refuses unknown fields such as ignore_eos with a 422. Its
    # `generation_config` field replaces the model's generation config; eos_token_id -1 matches no token, so both its
    # continuous-batching and its generate path run to max_new_tokens. Greedy, as do_sample is off.
    config = {"max_new_tokens": length, "eos_token_id": -1, "do_sample": False}
    return {"max_tokens": length, "generation_config": json.dumps(config)}


def _chat(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}]}


def _openai_text(payload: dict) -> Chunk:
    choice = payload["choices"][0] if payload.get("choices") else {}
    return Chunk(choice.get("text") or (choice.get("message") or {}).get("content") or "", payload.get("usage"))


@dataclass(frozen=True)
class Protocol:
    path: str
    body: Callable[[str, int, str | None], dict]  # (prompt, output length, model name) -> JSON body
    chunks: Callable[..., Iterator[Chunk]]  # the streamed answer
    whole: Callable[[bytes], Chunk]  # the answer with --no-stream

    def request(self, prompt: str, length: int, model: str | None, stream: bool) -> tuple[str, dict]:
        """The path and body, streaming or not."""
        body = self.body(prompt, length, model)
        if stream:
            return self.path, body
        body.pop("stream_options", None)
        return self.path.partition("?")[0], {**body, "stream": False}


PROTOCOLS = {
    "infer": Protocol("/infer", lambda prompt, n, model: {
        "instances": [prompt], "params": _greedy_fixed_length(n), "stream": True,
    }, ndjson_chunks, lambda raw: Chunk(json.loads(raw)[0])),
    "generate": Protocol("/generate?streaming=true", lambda prompt, n, model: {
        "prompt": prompt, **_greedy_fixed_length(n),
    }, text_chunks, lambda raw: Chunk(raw.decode("utf-8", errors="replace"))),
    "completions": Protocol("/v1/completions", lambda prompt, n, model: _openai_stream(
        {"prompt": prompt, **_greedy_fixed_length(n)}, model), sse_chunks, lambda raw: _openai_text(json.loads(raw))),
    "chat": Protocol("/v1/chat/completions", lambda prompt, n, model: _openai_stream(
        {**_chat(prompt), **_greedy_fixed_length(n)}, model), sse_chunks, lambda raw: _openai_text(json.loads(raw))),
    "hf-completions": Protocol("/v1/completions", lambda prompt, n, model: _openai_stream(
        {"prompt": prompt, **_hf_fixed_length(n)}, model), sse_chunks, lambda raw: _openai_text(json.loads(raw))),
    "hf-chat": Protocol("/v1/chat/completions", lambda prompt, n, model: _openai_stream(
        {**_chat(prompt), **_hf_fixed_length(n)}, model), sse_chunks, lambda raw: _openai_text(json.loads(raw))),
}


def error_message(payload) -> str:
    """The message of an error body in this server's / OpenAI's shape ({"error": {"message"}}) or another."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload))
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(payload)


# ---------------------------------------------------------------------------------------------------------------
# One request.


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    protocol: str

    @property
    def address(self) -> tuple[str, str, int | None, str]:
        parts = urlsplit(self.url)
        return parts.scheme, parts.hostname or "127.0.0.1", parts.port, parts.path.rstrip("/")


@dataclass
class Outcome:
    prompt_tokens: int
    chunk_times: list[float] = field(default_factory=list)  # seconds after sending, one per non-empty text chunk
    texts: list[str] = field(default_factory=list)
    usage: dict | None = None
    e2e: float | None = None
    error: str | None = None
    output_tokens: int = 0  # filled in after the run (re-tokenizing costs CPU the run should not share)
    counted_from: str = "usage"  # or "text": re-tokenized, which can be a token off (see count_output_tokens)
    worker: str | None = None  # this server's X-Worker-Pid: how requests spread over its workers
    client_pid: int = field(default_factory=os.getpid)  # which client process sent it (--client-processes)


def send(server: Server, prompt: str, options) -> Outcome:
    """POST one request on a fresh connection and time every text chunk of the answer (--no-stream: the whole
    answer, so only its end-to-end time)."""
    protocol = PROTOCOLS[server.protocol]
    scheme, host, port, base_path = server.address
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    connection = connection_class(host, port, timeout=options.timeout)
    headers = {"Content-Type": "application/json"}
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    path, body = protocol.request(prompt, options.output_len, options.model, options.stream)
    body = json.dumps(body)
    outcome = Outcome(prompt_tokens=options.prompt_len)  # until the server's usage says otherwise
    start = time.perf_counter()
    try:
        connection.request("POST", base_path + path, body=body, headers=headers)
        response = connection.getresponse()
        outcome.worker = response.getheader("X-Worker-Pid")
        if response.status != 200:
            raw = response.read(4000)
            try:
                detail = error_message(json.loads(raw))
            except ValueError:
                detail = raw.decode("utf-8", errors="replace").strip()[:200]
            outcome.error = f"HTTP {response.status}: {detail}"
            return outcome
        chunks = protocol.chunks(response) if options.stream else [protocol.whole(response.read())]
        for chunk in chunks:
            if chunk.text:
                if options.stream:
                    outcome.chunk_times.append(time.perf_counter() - start)
                outcome.texts.append(chunk.text)
            if chunk.usage:
                outcome.usage = chunk.usage
        outcome.e2e = time.perf_counter() - start
        if not outcome.texts:
            outcome.error = "the answer had no text"
    except StreamError as error:
        outcome.error = f"error in the stream: {error}"
    except (OSError, http.client.HTTPException, ValueError) as error:  # refused, reset, timeout, bad JSON
        outcome.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    return outcome

# ---------------------------------------------------------------------------------------------------------------
# One run: C threads keep C requests in flight.


def run_level(server: Server, prompts: list[str], concurrency: int, options, label: str,
              duration_s: float | None = None) -> tuple[list[Outcome], float, float]:
    """Send the prompts (cycled until `duration_s` when given); return the outcomes, wall time, client CPU time.

    With --client-processes P the clients are split over P processes (each its own GIL): one Python process
    parsing thousands of streamed chunks a second would otherwise be the bottleneck it measures."""
    processes = min(options.client_processes, concurrency)
    if processes <= 1:
        return _run_clients(server, prompts, concurrency, options, label, duration_s, options.progress)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_run_clients, server, prompts[i::processes], share,
                               options, label, duration_s, False) for i, share in enumerate(shares)]
        results = [future.result() for future in futures]
    outcomes = [outcome for result in results for outcome in result[0]]
    return outcomes, max(result[1] for result in results), sum(result[2] for result in results)


def _run_clients(server: Server, prompts: list[str], concurrency: int, options, label: str,
                 duration_s: float | None, progress_bar: bool) -> tuple[list[Outcome], float, float]:
    """`concurrency` client threads in this process: see run_level."""
    progress = make_progress(None if duration_s else len(prompts), label, progress_bar)

    def one(_client: int, prompt: str) -> Outcome:
        outcome = send(server, prompt, options)
        progress.update(1)
        return outcome

    clients = Clients(one, concurrency, itertools.cycle(prompts) if duration_s else prompts, duration_s)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    sent = clients.start().join()
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    progress.close()
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return [one_sent.result for one_sent in sent], elapsed, cpu


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(total: int | None, label: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)
