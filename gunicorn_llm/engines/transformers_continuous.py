"""The continuous-batching path of the transformers engine: transformers' own `ContinuousBatchingManager`.

One manager per worker runs a generation loop in its own thread; request threads add sequences to it (one per
choice) and a routing thread turns the manager's streamed outputs into `ChoiceUpdate`s on each request's stream.
Sequences join and leave the running batch at every step, so a short request never waits for a long one, and a
cancelled one leaves at once.

The manager applies temperature, top-k and top-p per request and a per-request end-of-sequence set. Structured
outputs and token controls are applied in the same batch by one more logits processor, put first in the manager's
list (`MaskedRows`): before each step the manager hands every per-request processor the states of the rows of that
step's logits, in order, so it catches each constrained sequence's grammar matcher up with the tokens it drew and,
on the step's logits, masks that row to what its grammar allows and applies its request's controls (grammars.py and
token_controls.py, as the slot path does); a constrained sequence's end-of-sequence set holds its grammar's, so the
manager ends it where its grammar does. That processor runs on the host at every step, which the manager allows only
when it neither replays CUDA graphs nor compiles its step (a graph would replay the first step's masks) and batches
synchronously (asynchronous batching prepares a step before the previous step's tokens reach the host, when no
matcher can know what comes next): with CUDA graphs (`--cuda-graphs`, or transformers' own choice) constrained and
controlled requests go to the batched-generate path, as do requests that need a sampling seed, penalties, min_p or
logprobs (`can_serve`; the engine drops a greedy request's seed before asking). Greedy decoding is top-k 1 sampling,
since the manager samples or argmaxes for every request alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from gunicorn_llm.engines.base import ChoiceUpdate, GenerationStream
from gunicorn_llm.engines.grammars import Grammars, advance, mask_logits, new_matcher
from gunicorn_llm.engines.token_controls import TokenControls, apply_to_rows
from gunicorn_llm.engines.transformers_batching import ContinuousPath
from gunicorn_llm.request_schema import SamplingParams

log = logging.getLogger("gunicorn.error")

_UNTOUCHED = (None, None, ())  # a row of MaskedRows with no matcher and no controls: left as it is
CPU_CACHE_BLOCKS = 32  # x 256-token pages: room for 8,192 tokens in flight per worker on CPU


@dataclass
class _Sequence:
    stream: GenerationStream
    choice: int
    max_tokens: int
    stop_ids: frozenset[int]  # what the manager ends it on (a constrained one's: its grammar's too)
    matcher: object | None = None  # a constrained choice's xgrammar matcher (grammars.py)
    controls: TokenControls | None = None  # its request's token controls (token_controls.py)
    sent: int = 0  # generated tokens already published (by the routing thread)
    fed: int = 0  # generated tokens its matcher accepted (by the manager's loop thread)


class MaskedRows(ContinuousBatchingLogitsProcessor):
    """The manager's first logits processor: each constrained or controlled sequence's row of a step's logits masked
    by its grammar and under its request's token controls; the other rows untouched. Both of its methods run in the
    manager's loop thread, `prepare_tensor_args` on the host before the step and `__call__` within it."""

    supported_kwargs: dict[str, type] = {}  # it takes nothing through add_request: it looks sequences up by id
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, sequence_of: Callable[[str], _Sequence | None]):
        self._sequence_of = sequence_of
        # this step's rows: (matcher, controls, tokens generated so far) each; None when no row needs anything
        self._rows: list[tuple] | None = None

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()  # its per-row argument is unused: what a row needs is in self._rows

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        """Given the states of the step's rows, in the order of its logits: catch the matchers up with the tokens
        their sequences drew since, and keep what each row needs."""
        rows = []
        for future in requests_with_new_token:
            sequence = self._sequence_of(future.state.request_id)  # None: an unknown or cancelled one
            if sequence is None or (sequence.matcher is None and sequence.controls is None):
                rows.append(_UNTOUCHED)
                continue
            generated = future.state.to_generation_output().generated_tokens  # also across an offload's re-prefill
            for token in generated[sequence.fed :]:
                advance(sequence.matcher, token)
            sequence.fed = len(generated)
            rows.append((sequence.matcher, sequence.controls, generated))
        self._rows = rows if any(row is not _UNTOUCHED for row in rows) else None
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            matchers, controls, outputs = zip(*self._rows, strict=True)
            rows = scores[: len(self._rows)]  # rows past them: prompts still prefilling in chunks, never sampled
            mask_logits(rows, matchers)
            apply_to_rows(rows, controls, outputs)
        return scores


def steps_on_the_host(config: ContinuousBatchingConfig) -> bool:
    """Whether a manager with this (resolved) configuration runs its logits processors as Python at every step, in
    step with the tokens drawn: no CUDA graphs, no compiled step, no asynchronous batching."""
    return (not any(config.cuda_graph_booleans) and not config.use_async_batching
            and config.varlen_compile_config is None and config.decode_compile_config is None)


def add_first_processor(manager, processor: ContinuousBatchingLogitsProcessor) -> None:
    """Put a per-request processor first in a manager's list before it starts. The list's constructor counts the
    argument rows it needs only for the processors it converts itself, so the count is raised here."""
    processors = manager.logit_processor
    processors.logits_processor.insert(0, processor)
    processors.tensors_required += 1
    processors.do_processing = True


class ContinuousBatching(ContinuousPath):
    name = "continuous"

    def __init__(self, model, pad_token_id: int, vocab_size: int, memory_share: float, on_death,
                 cuda_graphs: bool = False, stream_interval: int = 1, grammars: Grammars | None = None):
        """`memory_share`: the fraction of the device's free memory this manager may take for its KV cache;
        `on_death(error)`: called once if the manager's loop dies; `cuda_graphs`: replay CUDA graphs (with
        asynchronous batching) instead of launching each kernel, captured at load and as batch shapes appear;
        `stream_interval`: tokens per streamed update (GenerationStream); `grammars`: the compiled
        structured-output constraints (needed for requests that have one)."""
        self.grammars = grammars
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
        self._sequences: dict[str, _Sequence] = {}
        # Whether constrained and controlled rows are masked in the manager's batch (see the module's docstring)
        self.masks_rows = steps_on_the_host(self.manager.continuous_batching_config)
        self.masked_rows = MaskedRows(lambda request_id: self._sequences.get(request_id)) if self.masks_rows else None
        if self.masked_rows is not None:
            add_first_processor(self.manager, self.masked_rows)
        if cuda_graphs:
            self.manager.warmup()  # the largest shapes first, so that the graph memory pool does not fragment
        self.manager.start()
        self._lock = threading.Lock()
        self._loop_error: BaseException | None = None
        self._closed = threading.Event()  # the routing thread ends with the manager (it would spin on a stopped one)
        threading.Thread(target=self._route_results, name="cb-results", daemon=True).start()

    def can_serve(self, params: SamplingParams) -> bool:
        samples_alike = (
            params.seed is None
            and params.logprobs is None
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0
            and params.min_p == 0.0
        )
        if params.structured_outputs is None and not params.controls_tokens:
            return samples_alike
        return samples_alike and self.masks_rows and (params.structured_outputs is None or self.grammars is not None)

    def start(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
              controls: TokenControls | None = None) -> GenerationStream:
        if self._loop_error is not None:
            raise RuntimeError(f"the generation loop died: {self._loop_error}")
        request_ids = [uuid.uuid4().hex for _ in range(params.n)]
        stream = GenerationStream(params.n, abort=lambda: self._cancel(request_ids), interval=self.stream_interval)
        sampling = self._sampling_kwargs(params)
        if params.structured_outputs is not None:  # its grammar, complete, allows only these: the sequence ends there
            stop_ids = stop_ids | self.grammars.stop_token_ids
        for choice, request_id in enumerate(request_ids):
            sequence = _Sequence(stream, choice, params.max_tokens, stop_ids,
                                 new_matcher(self.grammars, params.structured_outputs), controls)
            with self._lock:  # registered before it is added, so its first step and first output always find it
                self._sequences[request_id] = sequence
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
