"""Benchmark client for LLM servers: throughput and latency over a concurrency sweep, one or several servers.

Talks to this server's `/infer` and `/generate`, and to any OpenAI-compatible `/v1/completions` or
`/v1/chat/completions` (this server, vLLM, `transformers serve`). Requests stream, so that time to first token
(TTFT), time per output token (TPOT) and inter-token latency (ITL) are measured as the client sees them;
`--no-stream` asks for whole answers instead (only end-to-end latency then).

- Prompts have an exact token length: random token ids (or one repeated sentence) decoded to text and re-encoded
  until the text is `--prompt-len` tokens for the tokenizer (`--tokenizer`, default the embedded model).
- Every request asks for exactly `--output-len` tokens with end-of-sequence ignored, greedy. Output tokens are the
  server's usage count when it sends one, else the answer's text re-tokenized (never characters); a request that
  came back with another length is reported, since it would skew TPOT.
- For each concurrency C, C client threads keep C requests in flight until `--requests-per-level` are done (or
  `--duration` seconds passed). With several servers the runs are interleaved: per level and repeat, one run on
  each server, alternating the order, so that drift on a noisy machine hits all alike; `--repeats` K gives the
  median of K runs and the ratio of every server to the first.

Prints one table row per server and concurrency, writes every run to `--json` and a plot to `--plot` (when
matplotlib is installed). Exit status 1 when any request failed.

    python bench.py --url http://127.0.0.1:5002 --concurrency 1 8 32 64 --prompt-len 128 --output-len 128
    python bench.py --url ours=http://127.0.0.1:5002@completions --url hf=http://127.0.0.1:8000@hf-completions \\
        --concurrency 1 8 32 64 --repeats 3 --json bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import multiprocessing
import os
import random
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")  # each reported in ms: mean, p50, p90, p99
FIXED_SENTENCE = "The quick brown fox jumps over the lazy dog while the sun sets slowly behind the hills. "
# Counts add up over repeats; every other number of a level is the median of its repeats.
SUMMED = ("requests", "failures", "input_tokens", "output_tokens", "wrong_output_len")


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
# Prompts of an exact token length.


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from gunicorn_llm.engines.model_store import embedded_model_dir

        path = str(embedded_model_dir())
    return AutoTokenizer.from_pretrained(path)


def exact_length_prompt(tokenizer, ids: list[int], length: int, more_ids: Callable[[int], list[int]]) -> str:
    """Text that the tokenizer encodes (special tokens included, as a server does) into exactly `length` ids.

    Decoding ids and encoding the text again may merge or split tokens, so trim or extend and repeat until the
    round trip is stable, as vLLM's random dataset does.
    """
    for _ in range(20):
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        ids = tokenizer(text)["input_ids"]
        if len(ids) == length:
            return text
        if len(ids) < length:
            ids = ids + more_ids(length - len(ids))
    raise SystemExit(f"error: could not build a prompt of exactly {length} tokens with this tokenizer")


class PromptMaker:
    """Prompts of `length` tokens: `random` ids (distinct per request) or one `fixed` sentence repeated."""

    def __init__(self, tokenizer, length: int, kind: str):
        self.tokenizer, self.length, self.kind = tokenizer, length, kind
        special = set(tokenizer.all_special_ids)
        self.vocabulary = [token for token in range(len(tokenizer)) if token not in special]
        self._fixed: str | None = None

    def make(self, count: int, seed: str) -> list[str]:
        if self.kind == "fixed":
            if self._fixed is None:
                sentence_ids = self.tokenizer(FIXED_SENTENCE, add_special_tokens=False)["input_ids"]
                repeat = list(itertools.islice(itertools.cycle(sentence_ids), self.length))
                self._fixed = exact_length_prompt(self.tokenizer, repeat, self.length, lambda n: repeat[:n])
            return [self._fixed] * count
        rng = random.Random(seed)  # a string seed: the same prompts for every server at one level and repeat

        def draw(n: int) -> list[int]:
            return rng.choices(self.vocabulary, k=n)

        return [exact_length_prompt(self.tokenizer, draw(self.length), self.length, draw) for _ in range(count)]


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
    lock = threading.Lock()
    queue = itertools.cycle(prompts) if duration_s else iter(prompts)
    outcomes: list[Outcome] = []
    progress = make_progress(None if duration_s else len(prompts), label, progress_bar)
    deadline = time.perf_counter() + duration_s if duration_s else None

    def client() -> None:
        while True:
            with lock:
                prompt = next(queue, None)
            if prompt is None or (deadline and time.perf_counter() >= deadline):
                return
            outcome = send(server, prompt, options)
            with lock:
                outcomes.append(outcome)
            progress.update(1)

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    progress.close()
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return outcomes, elapsed, cpu


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


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


def percentiles(values: list[float]) -> list[float | None]:
    """p50, p90, p99 (linear interpolation, numpy's default); None for no values."""
    if not values:
        return [None] * len(PERCENTILES)
    try:
        import numpy

        return [float(v) for v in numpy.percentile(values, PERCENTILES)]
    except ImportError:
        ordered = sorted(values)
        result = []
        for p in PERCENTILES:
            position = (len(ordered) - 1) * p / 100
            low = int(position)
            high = min(low + 1, len(ordered) - 1)
            result.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
        return result


def count_output_tokens(outcomes: list[Outcome], tokenizer) -> None:
    """Output tokens from the server's usage, else from the answer's text re-tokenized.

    Re-tokenizing is not always the inverse of generating: two "\n" tokens generated one after the other come
    back as one "\n\n" token. So a text count can be a token or two off on arbitrary text.
    """
    to_tokenize = [o for o in outcomes if o.error is None and not (o.usage or {}).get("completion_tokens")]
    if to_tokenize:
        texts = ["".join(o.texts) for o in to_tokenize]
        for outcome, ids in zip(to_tokenize, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            outcome.output_tokens = len(ids)
            outcome.counted_from = "text"
    for outcome in outcomes:
        if outcome.error is None and (outcome.usage or {}).get("completion_tokens"):
            outcome.output_tokens = outcome.usage["completion_tokens"]
            outcome.prompt_tokens = outcome.usage.get("prompt_tokens") or outcome.prompt_tokens


def summarize(outcomes: list[Outcome], elapsed: float, cpu: float, options) -> dict:
    """One run's figures; latencies in ms. Failed requests count only as failures."""
    ok = [o for o in outcomes if o.error is None]
    samples = {
        # Whole answers (--no-stream) have no first-token time.
        "ttft": [o.chunk_times[0] for o in ok if o.chunk_times],
        "tpot": [(o.e2e - o.chunk_times[0]) / (o.output_tokens - 1)
                 for o in ok if o.chunk_times and o.output_tokens > 1],
        "itl": [b - a for o in ok for a, b in itertools.pairwise(o.chunk_times)],
        "e2e": [o.e2e for o in ok],
    }
    input_tokens = sum(o.prompt_tokens for o in ok)
    output_tokens = sum(o.output_tokens for o in ok)
    lengths = [o.output_tokens for o in ok]
    summary = {
        "requests": len(outcomes),
        "failures": len(outcomes) - len(ok),
        "duration_s": elapsed,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (input_tokens + output_tokens) / elapsed,
        "req_s": len(ok) / elapsed,
        "wrong_output_len": sum(n != options.output_len for n in lengths),
        "output_len_min": min(lengths, default=None),
        "output_len_max": max(lengths, default=None),
        "output_counted_from": "/".join(sorted({o.counted_from for o in ok})) or None,
        # Of one core, summed over the client processes: near 100 x processes would mean the client limits the
        # figures. Meaningless when nothing was answered.
        "client_cpu_pct": 100 * cpu / elapsed if ok else None,
        "client_processes": len({o.client_pid for o in outcomes}),
    }
    for name, values in samples.items():
        summary[f"{name}_ms_mean"] = 1000 * statistics.fmean(values) if values else None
        for p, value in zip(PERCENTILES, percentiles(values)):
            summary[f"{name}_ms_p{p}"] = None if value is None else 1000 * value
    summary["errors"] = dict(Counter(o.error for o in outcomes if o.error).most_common(5))
    summary["per_worker"] = dict(Counter(o.worker for o in ok if o.worker))
    return summary


def combine_repeats(runs: list[dict]) -> dict:
    """A level's figures over its repeats: counts summed, min/max kept, everything else the median."""
    combined = {}
    for key in runs[0]:
        values = [run[key] for run in runs if run[key] is not None]
        if key == "errors":
            combined[key] = dict(sum((Counter(run[key]) for run in runs), Counter()).most_common(5))
        elif key == "per_worker":
            combined[key] = dict(sum((Counter(run[key]) for run in runs), Counter()))
        elif not values:
            combined[key] = None
        elif isinstance(values[0], str):  # output_counted_from: every source any repeat used
            combined[key] = "/".join(sorted({part for value in values for part in value.split("/")}))
        elif key in SUMMED:
            combined[key] = sum(values)
        elif key.endswith("_min"):
            combined[key] = min(values)
        elif key.endswith("_max"):
            combined[key] = max(values)
        else:
            combined[key] = statistics.median(values)
    return combined


RATIO_METRICS = ("output_tok_s", "total_tok_s", "req_s", "ttft_ms_p50", "tpot_ms_p50", "itl_ms_p50",
                 "e2e_ms_p50", "e2e_ms_p99")


def ratios(summary: dict, servers: list[Server], levels: list[int]) -> list[dict]:
    """Every other server's figures divided by the first server's, per level."""
    rows = []
    baseline = servers[0]
    for other in servers[1:]:
        for level in levels:
            base, this = summary[(baseline.name, level)], summary[(other.name, level)]
            rows.append({
                "concurrency": level, "server": other.name, "baseline": baseline.name,
                **{key: (this[key] / base[key] if this[key] is not None and base[key] else None)
                   for key in RATIO_METRICS},
            })
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output: table, JSON, plot.


def _number(value, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _spread(summary: dict, name: str) -> str:
    return "/".join(_number(summary[f"{name}_ms_p{p}"], 0 if (summary[f"{name}_ms_p{p}"] or 0) >= 100 else 1)
                    for p in PERCENTILES)


def print_table(summary: dict, servers: list[Server], levels: list[int]) -> None:
    header = (f"{'server':<16} {'conc':>4} {'reqs':>5} {'fail':>4} {'out tok/s':>9} {'tot tok/s':>9} {'req/s':>6} "
              f"{'TTFT ms p50/90/99':>20} {'TPOT ms p50/90/99':>20} {'ITL ms p50/90/99':>20} "
              f"{'E2E ms p50/90/99':>22} {'client CPU':>10}")
    print(header)
    print("-" * len(header))
    for level in levels:
        for server in servers:
            s = summary[(server.name, level)]
            print(f"{server.name[:16]:<16} {level:>4} {s['requests']:>5} {s['failures']:>4} "
                  f"{_number(s['output_tok_s']):>9} {_number(s['total_tok_s']):>9} {_number(s['req_s'], 2):>6} "
                  f"{_spread(s, 'ttft'):>20} {_spread(s, 'tpot'):>20} {_spread(s, 'itl'):>20} "
                  f"{_spread(s, 'e2e'):>22} {_number(s['client_cpu_pct'], 0, '%'):>10}")


def print_ratios(rows: list[dict]) -> None:
    print("\nratio (server / baseline; above 1: more throughput, or slower for latencies)")
    header = (f"{'server / baseline':<28} {'conc':>4} {'out tok/s':>9} {'tot tok/s':>9} {'req/s':>6} "
              f"{'TTFT p50':>8} {'TPOT p50':>8} {'ITL p50':>8} {'E2E p50':>8} {'E2E p99':>8}")
    print(header)
    for row in rows:
        values = " ".join(f"{_number(row[key], 2):>{width}}" for key, width in zip(RATIO_METRICS, (9, 9, 6, 8, 8,
                                                                                                   8, 8, 8)))
        print(f"{(row['server'] + ' / ' + row['baseline'])[:28]:<28} {row['concurrency']:>4} {values}")


def write_plot(path: Path, summary: dict, servers: list[Server], levels: list[int], title: str) -> bool:
    """Output tok/s and p50 (p90 dashed) TTFT, TPOT and E2E against concurrency; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("output_tok_s", None, "output tokens/s"), ("ttft_ms_p50", "ttft_ms_p90", "TTFT (ms)"),
              ("tpot_ms_p50", "tpot_ms_p90", "TPOT (ms)"), ("e2e_ms_p50", "e2e_ms_p90", "end-to-end latency (ms)"))

    def values(server: Server, key: str) -> list[float]:  # a level without figures (all failed) is a gap
        return [float("nan") if summary[(server.name, c)][key] is None else summary[(server.name, c)][key]
                for c in levels]

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, (key, p90_key, panel_title) in zip(axes.flat, panels):
        for index, server in enumerate(servers):
            color = f"C{index}"
            axis.plot(levels, values(server, key), "o-", color=color,
                      label=f"{server.name} (p50)" if p90_key else server.name)
            if p90_key:
                axis.plot(levels, values(server, p90_key), "--", color=color, alpha=0.6, label=f"{server.name} (p90)")
        axis.set_title(panel_title)
        axis.set_xlabel("concurrency")
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def parse_server(spec: str, index: int, default_protocol: str) -> Server:
    """`[NAME=]URL[@PROTOCOL]`, e.g. `ours=http://127.0.0.1:5002@infer`."""
    name, _, url = spec.partition("=") if "=" in spec.split("://")[0] else ("", "", spec)
    protocol = default_protocol
    if "@" in url and url.rsplit("@", 1)[1] in PROTOCOLS:
        url, protocol = url.rsplit("@", 1)
    if not url.startswith(("http://", "https://")):
        raise SystemExit(f"error: --url {spec!r}: expected [NAME=]http(s)://HOST:PORT[@PROTOCOL]")
    return Server(name or urlsplit(url).netloc or f"server{index}", url.rstrip("/"), protocol)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--url", action="append", required=True, metavar="[NAME=]URL[@PROTOCOL]",
                     help="a server to measure (repeatable); the first is the baseline of the ratios")
    cli.add_argument("--protocol", choices=list(PROTOCOLS), default="completions",
                     help="for URLs without @PROTOCOL (default completions); hf-completions and hf-chat are the "
                          "OpenAI routes of `transformers serve`, which refuses ignore_eos")
    cli.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    cli.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    cli.add_argument("--output-len", type=int, default=128, help="output tokens, EOS ignored (default 128)")
    cli.add_argument("--prompts", choices=("random", "fixed"), default="random",
                     help="random token ids, different per request (default), or one fixed sentence repeated")
    amount = cli.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-level", type=int, help="requests per run (default max(4 x C, 16))")
    amount.add_argument("--duration", type=float, help="seconds per run instead of a request count")
    cli.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="stream answers (default); --no-stream: whole answers, end-to-end latency only")
    cli.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server first (default 2)")
    cli.add_argument("--repeats", type=int, default=1, help="runs per server and level; the median is reported")
    cli.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                     help="with several servers: per level and repeat one run on each (default), alternating order")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--tokenizer", help="tokenizer folder or name (default: the embedded model)")
    cli.add_argument("--model", help="model name for the OpenAI routes (default: left out, the server's own)")
    cli.add_argument("--api-key", help="sent as Authorization: Bearer")
    cli.add_argument("--timeout", type=float, default=600, help="seconds a request may wait for a byte (600)")
    cli.add_argument("--json", type=Path, help="write every run and the summary here")
    cli.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    cli.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    cli.add_argument("--client-processes", type=int, default=1,
                     help="split each run's clients over this many processes, for thousands of tokens a second "
                          "(default 1; with more, progress shows per run, not per request)")
    options = cli.parse_args(argv)
    if min(options.concurrency + [options.prompt_len, options.output_len, options.repeats,
                                  options.client_processes]) < 1:
        cli.error("--concurrency, --prompt-len, --output-len, --repeats and --client-processes must be at least 1")
    options.servers = [parse_server(spec, i, options.protocol) for i, spec in enumerate(options.url)]
    if len({s.name for s in options.servers}) != len(options.servers):
        cli.error("two --url have the same name: label them NAME=URL")
    return options


def schedule(servers: list[Server], levels: list[int], repeats: int, interleave: bool):
    """(server, level, repeat) in run order. Interleaved: each level and repeat on every server back to back, the
    order reversed from one such slot to the next, so that no server always runs first."""
    if not interleave:
        return [(s, c, r) for s in servers for c in levels for r in range(repeats)]
    slots = [(c, r) for c in levels for r in range(repeats)]
    return [(s, c, r) for slot, (c, r) in enumerate(slots) for s in (servers if slot % 2 == 0 else servers[::-1])]


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    servers, levels = options.servers, options.concurrency
    tokenizer = load_tokenizer(options.tokenizer)
    prompt_maker = PromptMaker(tokenizer, options.prompt_len, options.prompts)
    for server in servers:
        print(f"{server.name}: {server.url} ({server.protocol}, {PROTOCOLS[server.protocol].path})", flush=True)

    if options.warmup:
        for server in servers:
            outcomes, _, _ = run_level(server, prompt_maker.make(options.warmup, f"{options.seed}-warmup"),
                                       min(options.warmup, max(levels)), options, f"{server.name} warm-up")
            failed = [o.error for o in outcomes if o.error]
            if failed:
                print(f"warning: {server.name}: {len(failed)} of {len(outcomes)} warm-up requests failed: "
                      f"{failed[0]}", flush=True)

    prompts: dict[tuple[int, int], list[str]] = {}  # the same prompts for every server at one level and repeat
    runs: dict[tuple[str, int], list[dict]] = {(s.name, c): [] for s in servers for c in levels}
    for server, level, repeat in schedule(servers, levels, options.repeats, options.interleave):
        count = options.requests_per_level or max(4 * level, 16)
        if options.duration:
            count = max(256, 2 * level)  # a pool to cycle through
        if (level, repeat) not in prompts:
            prompts[(level, repeat)] = prompt_maker.make(count, f"{options.seed}-{level}-{repeat}")
        label = f"{server.name} c={level} [{repeat + 1}/{options.repeats}]"
        outcomes, elapsed, cpu = run_level(server, prompts[(level, repeat)], level, options, label, options.duration)
        count_output_tokens(outcomes, tokenizer)
        run = summarize(outcomes, elapsed, cpu, options)
        runs[(server.name, level)].append(run)
        print(f"{label}: {run['requests'] - run['failures']} ok, {run['failures']} failed, "
              f"{_number(run['output_tok_s'])} output tok/s, TTFT p50 {_number(run['ttft_ms_p50'])} ms, "
              f"TPOT p50 {_number(run['tpot_ms_p50'])} ms", flush=True)

    summary = {key: combine_repeats(level_runs) for key, level_runs in runs.items()}
    title = (f"{options.prompt_len} prompt tokens ({options.prompts}), {options.output_len} output tokens (EOS "
             f"ignored), greedy; median of {options.repeats} run(s)")
    print(f"\n{title}, requests summed over them\n")
    print_table(summary, servers, levels)
    ratio_rows = ratios(summary, servers, levels) if len(servers) > 1 else []
    if ratio_rows:
        print_ratios(ratio_rows)

    spread = [(name, level, s["per_worker"]) for (name, level), s in summary.items() if len(s["per_worker"]) > 1]
    if spread:
        print("\nanswered requests per worker (X-Worker-Pid)")
        for name, level, counts in spread:
            print(f"  {name} c={level}: " + ", ".join(f"{pid}: {n}" for pid, n in sorted(counts.items())))

    exit_status = 0
    for (name, level), s in summary.items():
        if s["wrong_output_len"]:
            why = ("counted by re-tokenizing the text, which can be a token or two off; far fewer means the server "
                   "stopped early" if "text" in s["output_counted_from"] else
                   "counted by the server: it stopped early or ignored the length; TPOT compares unequal work")
            print(f"warning: {name} c={level}: {s['wrong_output_len']} of {s['requests'] - s['failures']} answers "
                  f"were not {options.output_len} tokens long ({s['output_len_min']}-{s['output_len_max']}), {why}")
        if s["failures"]:
            exit_status = 1
            errors = "; ".join(f"{count} x {message}" for message, count in s["errors"].items())
            print(f"error: {name} c={level}: {s['failures']} of {s['requests']} requests failed: {errors}")

    if options.json:
        config = {key: value for key, value in vars(options).items() if key not in ("servers", "url", "api_key")}
        document = {
            "config": {**config, "json": str(options.json), "plot": options.plot and str(options.plot)},
            "servers": [vars(s) for s in servers],
            "runs": [{"server": name, "concurrency": level, "repeat": repeat, **run}
                     for (name, level), level_runs in runs.items() for repeat, run in enumerate(level_runs)],
            "summary": [{"server": name, "concurrency": level, **s} for (name, level), s in summary.items()],
            "ratios": ratio_rows,
        }
        options.json.write_text(json.dumps(document, indent=1))
        print(f"\nwrote {options.json}")
    if options.plot:
        if write_plot(options.plot, summary, servers, levels, title):
            print(f"wrote {options.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib); the JSON has every figure")
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
