"""The continuous-batching path of the transformers engine: transformers' own `ContinuousBatchingManager`.

One manager per worker runs a generation loop in its own thread; request threads add sequences to it (one per
choice) and a routing thread turns the manager's streamed outputs into `ChoiceUpdate`s on each request's stream.
Sequences join and leave the running batch at every step, so a short request never waits for a long one, and a
cancelled one leaves at once.

The manager applies temperature, top-k and top-p per request and a per-request end-of-sequence set; requests that
need anything else (a sampling seed, penalties, min_p, logprobs, structured outputs or token controls: the manager
has no per-request logits hook to mask or bias a sequence's logits) go to the engine's batched `generate` path instead
(`can_serve`; the engine drops a greedy request's seed before asking). Greedy decoding is top-k 1 sampling, since
the manager samples or argmaxes for every request alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass

from transformers import ContinuousBatchingConfig, GenerationConfig

from gunicorn_llm.engines.base import ChoiceUpdate, GenerationStream
from gunicorn_llm.engines.transformers_batching import ContinuousPath
from gunicorn_llm.request_schema import SamplingParams

log = logging.getLogger("gunicorn.error")

CPU_CACHE_BLOCKS = 32  # x 256-token pages: room for 8,192 tokens in flight per worker on CPU


@dataclass
class _Sequence:
    stream: GenerationStream
    choice: int
    max_tokens: int
    stop_ids: frozenset[int]
    sent: int = 0  # generated tokens already published


class ContinuousBatching(ContinuousPath):
    name = "continuous"

    def __init__(self, model, pad_token_id: int, vocab_size: int, memory_share: float, on_death,
                 cuda_graphs: bool = False, stream_interval: int = 1):
        """`memory_share`: the fraction of the device's free memory this manager may take for its KV cache;
        `on_death(error)`: called once if the manager's loop dies; `cuda_graphs`: replay CUDA graphs (with
        asynchronous batching) instead of launching each kernel, captured at load and as batch shapes appear;
        `stream_interval`: tokens per streamed update (GenerationStream)."""
        self.stream_interval = stream_interval
        self.vocab_size = vocab_size
        self.on_death = on_death
        # Values other than the neutral ones make the manager build its per-request temperature, top-k and top-p
        # processors; every request then passes all three, so these defaults never apply to a request.
        config = GenerationConfig(
            do_sample=True, temperature=0.5, top_k=50, top_p=0.5, pad_token_id=pad_token_id, max_new_tokens=16,
            eos_token_id=-1,  # none by default: each request passes its own stop tokens
        )
        self.manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True,
                max_memory_percent=memory_share,
                # On CPU the share would be of the host's RAM (12 GB on a 24 GB machine): a fixed, small cache.
                num_blocks=None if model.device.type == "cuda" else CPU_CACHE_BLOCKS,
                # None: transformers' choice, which is off with SDPA attention (it needs a mask and padding).
                use_cuda_graph=True if cuda_graphs else None,
                use_async_batching=True if cuda_graphs else None,
            ),
        )
        if cuda_graphs:
            self.manager.warmup()  # the largest shapes first, so that the graph memory pool does not fragment
        self.manager.start()
        self._sequences: dict[str, _Sequence] = {}
        self._lock = threading.Lock()
        self._loop_error: BaseException | None = None
        self._closed = threading.Event()  # the routing thread ends with the manager (it would spin on a stopped one)
        threading.Thread(target=self._route_results, name="cb-results", daemon=True).start()

    @staticmethod
    def can_serve(params: SamplingParams) -> bool:
        return (
            params.seed is None
            and params.logprobs is None
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0
            and params.min_p == 0.0
            and params.structured_outputs is None
            and not params.controls_tokens
        )

    def start(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
              controls=None) -> GenerationStream:  # controls: always None here (can_serve)
        if self._loop_error is not None:
            raise RuntimeError(f"the generation loop died: {self._loop_error}")
        request_ids = [uuid.uuid4().hex for _ in range(params.n)]
        stream = GenerationStream(params.n, abort=lambda: self._cancel(request_ids), interval=self.stream_interval)
        sampling = self._sampling_kwargs(params)
        for choice, request_id in enumerate(request_ids):
            with self._lock:  # registered before it is added, so its first output always finds it
                self._sequences[request_id] = _Sequence(stream, choice, params.max_tokens, stop_ids)
            added = self.manager.add_request(
                prompt_ids, request_id=request_id, max_new_tokens=params.max_tokens, eos_token_id=list(stop_ids),
                streaming=True, **sampling,
            )
            if added is None:
                self._cancel(request_ids)
                raise RuntimeError("the continuous batching manager is not accepting requests")
        return stream

    def running(self) -> int:
        return len(self._sequences)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the manager's generation loop. Its thread is not a daemon: a process that never stops it waits for
        it forever as it exits. The routing thread ends after it, once it has handed on what the loop produced."""
        self.manager.stop(block=True, timeout=timeout_s)
        self._closed.set()

    def _sampling_kwargs(self, params: SamplingParams) -> dict:
        if params.is_greedy:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        top_k = params.top_k if params.top_k > 0 else self.vocab_size
        return {"temperature": float(params.temperature), "top_k": top_k, "top_p": float(params.top_p)}

    def _cancel(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            with self._lock:
                running = self._sequences.pop(request_id, None) is not None
            if running:
                self.manager.cancel_request(request_id)

    def paused(self):
        """A context in which the caller has the model to itself (the generation loop waits, keeping its batch)."""
        return self.manager.pause() if self.manager.is_running() else contextlib.nullcontext()

    def _route_results(self) -> None:
        while True:
            output = self.manager.get_result(timeout=1.0)
            if output is None:
                error = self.manager.background_thread_status.fatal_error
                if error is not None:
                    self._fail_all(error)
                    return
                if self._closed.is_set():
                    return
                continue
            finished = output.is_finished()
            with self._lock:
                sequence = self._sequences.get(output.request_id)
                if sequence is not None and finished:
                    del self._sequences[output.request_id]
            if sequence is None:
                continue  # cancelled meanwhile
            if output.error:
                sequence.stream.fail(RuntimeError(f"generation failed: {output.error}"))
                continue
            tokens = list(output.generated_tokens)  # cumulative in streaming mode
            new, sequence.sent = tokens[sequence.sent :], len(tokens)
            reason = None
            if finished:
                reason = "stop" if tokens and tokens[-1] in sequence.stop_ids else "length"
            if new or reason:
                sequence.stream.publish(ChoiceUpdate(sequence.choice, new, None, reason))

    def _fail_all(self, error: BaseException) -> None:
        log.error("continuous batching loop died: %s", error)
        self.on_death(error)
        with self._lock:
            self._loop_error = error
            sequences, self._sequences = self._sequences, {}
        for sequence in sequences.values():
            sequence.stream.fail(RuntimeError(f"the generation loop died: {error}"))
