"""This server's own continuous batching for the transformers engine: a static KV cache of slots, and decode steps
replayed as CUDA graphs captured when the worker loads.

Why: launching a model's few hundred kernels one by one costs tens of milliseconds per step on the GPU machines
measured (docs/benchmarks.md), whatever the batch; a CUDA graph replays a whole step with one launch.
transformers' own continuous batching captures a graph per padded shape as shapes appear, which stalls serving each
time; here every decode shape (batch bucket x length bucket) is captured once, before the worker serves.

Layout: each running sequence owns a slot, a row of one preallocated cache [keys/values, layers, slots, kv heads,
max length, head dim], and writes its token at position p into column p. Running sequences always occupy slots
0..n-1 (a finished sequence's slot is refilled by moving the last one), so a decode step runs the graph of the
smallest batch bucket >= n and the smallest length bucket that holds the longest sequence; rows past n compute
garbage nobody reads. New prompts are prefilled eagerly, several together, into their slots; the tokens they all
start with (few-shot examples, a system prompt) are copied from a running sequence's slot that holds them, or else run
once and copied (on CPU, 1.5-2x faster on a 5-shot load: docs/benchmarks.md).

The model runs unmodified: `SlotCache` is its `past_key_values` (attention layers call only `update`), and a 4D
mask limits each row to its own tokens. Sampling runs after the graph, every row under its own request's parameters
(transformers_sampling.py: log-probabilities, token controls, penalties, temperature, top-k, top-p, min-p, and one
generator per seeded sequence, and the structured-output mask of constrained sequences, grammars.py), so every
generation request can be served here, constrained and unconstrained ones in the same batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from gunicorn_llm.engines.base import ChoiceUpdate, GenerationStream, TokenLogprob
from gunicorn_llm.engines.grammars import Grammars, advance, new_matcher
from gunicorn_llm.engines.token_controls import TokenControls
from gunicorn_llm.engines.transformers_batching import ContinuousPath
from gunicorn_llm.engines.transformers_sampling import RowSampler, generator_for
from gunicorn_llm.request_schema import RequestError, SamplingParams

log = logging.getLogger("gunicorn.error")

PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens in one prefill forward pass
SMALLEST_LENGTH_BUCKET = 128
MIN_SHARED_PREFIX = 32  # prompt tokens shared by a prefill batch's prompts below which each runs its own


def supports(config, max_len: int) -> bool:
    """Whether the model's attention is plain causal attention over the whole sequence, which the slot layout and
    its 4D masks reproduce; others (sliding windows, soft-capping, alternating layer types) use transformers' own
    continuous batching."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    return (
        not getattr(text, "is_encoder_decoder", False)
        and (window is None or window >= max_len)
        and getattr(text, "final_logit_softcapping", None) is None
        and getattr(text, "attn_logit_softcapping", None) is None
        and all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ())
        # None: not chosen yet (a config not attached to a model), which becomes SDPA
        and (getattr(config, "_attn_implementation", None) or "sdpa") in ("sdpa", "eager")
    )


def _buckets(largest: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` up to `largest`, and `largest` itself."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return sizes + [largest]


def _layers_heads_dim(config) -> tuple[int, int, int]:
    """Layers, key/value heads and head size: the shape of one token's keys and values."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return text.num_hidden_layers, kv_heads, getattr(text, "head_dim", None) or text.hidden_size // heads


class SlotCache:
    """The KV cache the model gets as `past_key_values`: one row (slot) per running sequence, each as long as the
    longest sequence served. What `update` does is set by the step about to run (`for_decode` or `for_prefill`)."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        layers, kv_heads, head_dim = _layers_heads_dim(config)
        self.kv = torch.zeros(2, layers, slots, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self._decode: tuple[int, int, torch.Tensor] | None = None  # rows, length, write positions
        self._prefill: tuple[int, int, int] | None = None  # first slot, prompts, prompt width

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        layers, kv_heads, head_dim = _layers_heads_dim(config)
        return 2 * layers * kv_heads * head_dim * dtype.itemsize

    def for_decode(self, rows: int, length: int, positions: torch.Tensor) -> None:
        """Next: one token for each of the first `rows` slots, written at `positions`; attention reads the first
        `length` columns."""
        self._decode, self._prefill = (rows, length, positions), None

    def for_prefill(self, first_slot: int, prompts: int, width: int, offset: int = 0) -> None:
        """Next: prompts (right-padded to `width`) written into consecutive slots from `first_slot`, from column
        `offset` on; attention reads the columns before it too (a shared prefix already in those slots)."""
        self._decode, self._prefill = None, (first_slot, prompts, width, offset)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.kv[0, layer_idx], self.kv[1, layer_idx]
        if self._prefill is not None:
            first, prompts, width, offset = self._prefill
            rows = slice(first, first + prompts)
            keys[rows, :, offset : offset + width] = key_states
            values[rows, :, offset : offset + width] = value_states
            if not offset:
                return key_states, value_states  # a new prompt attends to itself only
            return keys[rows, :, : offset + width], values[rows, :, : offset + width]  # and to its shared prefix
        rows, length, positions = self._decode
        keys, values = keys[:rows, :, :length], values[:rows, :, :length]
        index = positions.view(rows, 1, 1, 1).expand_as(key_states)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values

    def copy_prefix(self, source: int, targets: range, length: int) -> None:
        """Copy the first `length` columns of slot `source` into the consecutive slots `targets`."""
        self.kv[:, :, targets.start : targets.stop, :, :length] = self.kv[:, :, source : source + 1, :, :length]

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Copy whole slots (every layer's keys and values) from `sources` to `targets`, in one kernel."""
        device = self.kv.device
        self.kv[:, :, torch.tensor(targets, device=device)] = self.kv[:, :, torch.tensor(sources, device=device)]


@dataclass
class _Sequence:
    stream: GenerationStream
    choice: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None  # a seeded sampling choice's own random numbers
    matcher: object | None = None  # a constrained choice's xgrammar matcher (grammars.py)
    controls: TokenControls | None = None  # its request's token controls (token_controls.py)
    arrived: float = field(default_factory=time.monotonic)
    position: int = 0  # the cache column the next token is written to (= tokens in the cache)
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False


def set_up_cuda_thread(device: torch.device) -> None:
    """Make this thread's cuBLAS handle now, as the worker loads. cuBLAS makes one per thread on its first matrix
    product, with memory from outside torch's allocator: at a first request the GPU may have none left (other
    servers' work, this worker's cached blocks), and the thread's first product fails."""
    if device.type == "cuda":
        torch.ones(1, 1, device=device) @ torch.ones(1, 1, device=device)


class SlotBatching(ContinuousPath):
    name = "slots"

    def __init__(self, model, slots: int, max_len: int, cache_bytes: int, cuda_graphs: bool, on_death, on_step,
                 stream_interval: int = 1, grammars: Grammars | None = None):
        """`slots`: sequences at most (fewer if their cache would not fit in `cache_bytes`); `max_len`: prompt plus
        generated tokens; `on_death(error)`: called once if the loop dies; `on_step()`: called once per decode
        step; `stream_interval`: tokens per streamed update (GenerationStream); `grammars`: the compiled
        structured-output constraints (needed for requests that have one)."""
        self.grammars = grammars
        self.stream_interval = stream_interval
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = self.head.weight.device
        self.on_death = on_death
        self.on_step = on_step
        self.max_len = max_len
        self.slots = self._fitting_slots(slots, cache_bytes)
        self.cache = SlotCache(model.config, self.slots, max_len, model.dtype, self.device)
        self._inputs = torch.zeros(2, self.slots, dtype=torch.long, device=self.device)  # token ids, positions
        self._columns = torch.arange(max_len, device=self.device)
        vocab_size = self.head.weight.shape[0]
        self.sampler = RowSampler(vocab_size, self.device)
        self._logits = torch.zeros(self.slots, vocab_size, dtype=torch.float32, device=self.device)
        self._batch_buckets = _buckets(self.slots)
        self._length_buckets = _buckets(max_len, min(SMALLEST_LENGTH_BUCKET, max_len))
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if cuda_graphs:
            self._capture_graphs()
        self._running: list[_Sequence] = []  # index = slot
        self._waiting: deque[_Sequence] = deque()
        self._wakeup = threading.Condition()
        self._model_lock = threading.Lock()
        self._last_prefill_seconds = 0.0
        self._loop_error: BaseException | None = None
        log.info("slot batching: %d slots of %d tokens, %s", self.slots, max_len,
                 f"{len(self._graphs)} CUDA graphs" if self._graphs else "eager steps")
        threading.Thread(target=self._loop, name="slot-batching", daemon=True).start()

    @staticmethod
    def can_serve(params: SamplingParams) -> bool:
        """Every generation request (prompt log-probabilities are not generation: the engine scores them)."""
        return True

    def _fitting_slots(self, wanted: int, cache_bytes: int) -> int:
        fitting = int(cache_bytes // (self.max_len * SlotCache.bytes_per_token(self.model.config, self.model.dtype)))
        if fitting < 1:
            raise RuntimeError(f"no room for one {self.max_len}-token sequence's KV cache in {cache_bytes / 2**30:.1f} "
                               "GiB: lower --max-model-len or raise --gpu-memory-utilization")
        if fitting < wanted:
            log.warning("slot batching: room for %d sequences of %d tokens, not %d (lower --max-model-len or raise "
                        "--gpu-memory-utilization to fit more)", fitting, self.max_len, wanted)
        return min(wanted, fitting)

    # -- what request threads call -------------------------------------------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
              controls: TokenControls | None = None) -> GenerationStream:
        if len(prompt_ids) >= self.max_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                               f"{self.max_len - 1} (--max-model-len {self.max_len})")
        sequences: list[_Sequence] = []
        stream = GenerationStream(params.n, abort=lambda: self._cancel(sequences), interval=self.stream_interval)
        sequences.extend(_Sequence(stream, choice, prompt_ids, params, stop_ids,
                                   generator_for(params, choice, self.device),
                                   new_matcher(self.grammars, params.structured_outputs), controls)
                         for choice in range(params.n))
        with self._wakeup:  # the same lock as _fail_all's: a sequence is either failed there or never queued
            if self._loop_error is not None:
                raise RuntimeError(f"the generation loop died: {self._loop_error}")
            self._waiting.extend(sequences)
            self._wakeup.notify()
        return stream

    def running(self) -> int:
        return len(self._running) + len(self._waiting)

    def describe(self) -> dict:
        return {"slots": self.slots}

    def paused(self):
        """A context in which the caller has the model to itself (the loop waits between steps, keeping its batch)."""
        return self._model_lock

    def _cancel(self, sequences: list[_Sequence]) -> None:
        for sequence in sequences:
            sequence.cancelled = True  # the loop drops it before its next step

    # -- the generation loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            set_up_cuda_thread(self.device)
            with torch.inference_mode():
                while True:
                    with self._wakeup:
                        while not self._running and not self._waiting:
                            self._wakeup.wait()
                    with self._model_lock:
                        if self._prefill_due():
                            self._prefill()
                        if self._running:
                            self._decode_step()
        except BaseException as error:  # noqa: BLE001 - every waiting client learns of it, and the worker is replaced
            self._fail_all(error)

    def _prefill_due(self) -> bool:
        """A prefill pass costs about as much however many prompts it takes: while sequences are decoding, new
        prompts wait to be prefilled together, at most as long as the last prefill took (or until they fill every
        free slot), so that prefills take at most about half the time."""
        if not self._waiting or len(self._running) == self.slots:
            return False
        if not self._running or len(self._waiting) >= self.slots - len(self._running):
            return True
        return time.monotonic() - self._waiting[0].arrived >= self._last_prefill_seconds

    def _take_prefill_batch(self) -> list[_Sequence]:
        batch: list[_Sequence] = []
        width = 0
        with self._wakeup:
            while self._waiting and len(self._running) + len(batch) < self.slots:
                sequence = self._waiting[0]
                if sequence.cancelled:
                    self._waiting.popleft()
                    continue
                wider = max(width, len(sequence.prompt_ids))
                if batch and wider * (len(batch) + 1) > PREFILL_TOKEN_BUDGET:
                    break
                batch.append(self._waiting.popleft())
                width = wider
        return batch

    def _prefill(self) -> None:
        started = time.monotonic()
        while self._waiting and len(self._running) < self.slots:
            batch = self._take_prefill_batch()
            if not batch:
                break
            first_slot = len(self._running)
            self._running.extend(batch)
            logits = self._prefill_logits(batch, first_slot)
            for sequence in batch:
                sequence.position = len(sequence.prompt_ids)
            self._advance(first_slot, *self.sampler.next_tokens(logits, batch))
        self._last_prefill_seconds = time.monotonic() - started

    def _prefill_logits(self, batch: list[_Sequence], first_slot: int) -> torch.Tensor:
        shared = self._shared_prefix(batch, first_slot)
        rows = [sequence.prompt_ids[shared:] for sequence in batch]
        hidden = self._prefill_hidden(rows, first_slot, shared)
        last = torch.tensor([len(row) - 1 for row in rows], device=self.device)
        return self.head(hidden[torch.arange(len(batch), device=self.device), last]).float()

    def _prefill_hidden(self, rows: list[list[int]], first_slot: int, offset: int) -> torch.Tensor:
        """Run token rows (right-padded) into consecutive slots from `first_slot`, after `offset` columns those
        slots already hold; each row attends to those columns and to its own tokens up to itself."""
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self.device)
        positions = self._columns[offset : offset + width]
        causal = (self._columns[: offset + width] <= positions[:, None]).view(1, 1, width, offset + width)
        self.cache.for_prefill(first_slot, len(rows), width, offset)
        return self.decoder(input_ids=ids, position_ids=positions.expand(len(rows), width), attention_mask=causal,
                            past_key_values=self.cache, use_cache=True).last_hidden_state

    def _shared_prefix(self, batch: list[_Sequence], first_slot: int) -> int:
        """Put the keys and values of the prompt tokens the batch's prompts all start with (few-shot examples, a
        system prompt; all but the last token) into the batch's slots: copied from a running sequence whose prompt
        starts the same way, else run once in the first slot and copied to the others. How many columns they now
        hold (0: too few shared tokens to bother)."""
        prompts = [sequence.prompt_ids for sequence in batch]
        common = min(len(os.path.commonprefix(prompts)), min(len(prompt) for prompt in prompts) - 1)
        if common < MIN_SHARED_PREFIX:
            return 0
        targets = range(first_slot, first_slot + len(batch))
        prefix = prompts[0][:common]
        reused, source = max((len(os.path.commonprefix([sequence.prompt_ids, prefix])), slot)
                             for slot, sequence in enumerate(self._running[:first_slot])) if first_slot else (0, 0)
        if reused >= MIN_SHARED_PREFIX:
            self.cache.copy_prefix(source, targets, reused)
            return reused
        if len(batch) == 1:
            return 0
        self._prefill_hidden([prefix], first_slot, 0)
        self.cache.copy_prefix(first_slot, targets[1:], common)
        return common

    def _decode_logits(self, rows: int, length: int) -> torch.Tensor:
        """One decode step for the first `rows` slots, reading `length` cache columns: what the graphs capture."""
        ids, positions = self._inputs[0, :rows], self._inputs[1, :rows]
        mask = (self._columns[:length] <= positions[:, None]).view(rows, 1, 1, length)
        self.cache.for_decode(rows, length, positions)
        hidden = self.decoder(input_ids=ids[:, None], position_ids=positions[:, None], attention_mask=mask,
                              past_key_values=self.cache, use_cache=True).last_hidden_state
        logits = self._logits[:rows]
        logits.copy_(self.head(hidden[:, -1]))  # one buffer all graphs write, rather than one output each
        return logits

    def _capture_graphs(self) -> None:
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            # Largest first, so that smaller graphs reuse the memory pool's blocks.
            for rows in reversed(self._batch_buckets):
                for length in reversed(self._length_buckets):
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):  # a first run outside capture lets cuBLAS set itself up
                        self._decode_logits(rows, length)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._decode_logits(rows, length)
                    self._graphs[(rows, length)] = graph
        torch.cuda.synchronize(self.device)
        log.info("slot batching: captured %d decode graphs in %.1f s", len(self._graphs), time.monotonic() - started)

    def _decode_step(self) -> None:
        self._drop_cancelled()
        if not self._running:
            return
        rows = next(size for size in self._batch_buckets if size >= len(self._running))
        longest = max(sequence.position for sequence in self._running)
        length = next(size for size in self._length_buckets if size > longest)
        padding = [0] * (rows - len(self._running))  # rows past the running ones: token 0 at column 0
        self._inputs[:, :rows].copy_(torch.tensor([[s.last_token for s in self._running] + padding,
                                                   [s.position for s in self._running] + padding]))
        if self._graphs:
            self._graphs[(rows, length)].replay()
            logits = self._logits[:rows]
        else:
            logits = self._decode_logits(rows, length)
        self.on_step()
        for sequence in self._running:
            sequence.position += 1  # the token fed in is in the cache now
        self._advance(0, *self.sampler.next_tokens(logits[: len(self._running)], self._running))

    def _advance(self, first_slot: int, tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Publish each slot's new token (with its log-probability entry, if asked for) from `first_slot` on; free
        the slots of sequences that ended."""
        ended = []
        for slot, (token, logprob) in enumerate(zip(tokens, logprobs, strict=False), start=first_slot):
            sequence = self._running[slot]
            sequence.output_ids.append(token)
            sequence.last_token = token
            if sequence.cancelled:
                ended.append(slot)
                continue
            reason = ("stop" if advance(sequence.matcher, token) or token in sequence.stop_ids
                      else "length" if len(sequence.output_ids) >= sequence.params.max_tokens
                      or len(sequence.prompt_ids) + len(sequence.output_ids) >= self.max_len else None)
            entries = None if logprob is None else [logprob]
            sequence.stream.publish(ChoiceUpdate(sequence.choice, [token], entries, reason))
            if reason is not None:
                ended.append(slot)
        self._release(ended)

    def _drop_cancelled(self) -> None:
        self._release([slot for slot, sequence in enumerate(self._running) if sequence.cancelled])

    def _release(self, ended: list[int]) -> None:
        """Free the slots of ended sequences, moving the last running ones into the holes (running sequences stay
        in slots 0..n-1)."""
        if not ended:
            return
        ended_set = set(ended)
        kept = len(self._running) - len(ended_set)
        holes = [slot for slot in sorted(ended_set) if slot < kept]
        movers = [slot for slot in range(kept, len(self._running)) if slot not in ended_set]
        if holes:
            self.cache.move(movers, holes)
            for hole, mover in zip(holes, movers, strict=False):
                self._running[hole] = self._running[mover]
        del self._running[kept:]

    def _fail_all(self, error: BaseException) -> None:
        log.error("slot batching loop died: %s", error)
        with self._wakeup:
            self._loop_error = error
            sequences = self._running + list(self._waiting)
            self._running, self._waiting = [], deque()
        self.on_death(error)
        for sequence in sequences:
            sequence.stream.fail(RuntimeError(f"the generation loop died: {error}"))
