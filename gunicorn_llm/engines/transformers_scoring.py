"""Prompt log-probabilities (log-likelihood requests) for the transformers engine: requests waiting together are
scored in shared forward passes, and a prefix they share runs once.

Evaluation harnesses send a question's context followed by each of its options, often after the same few-shot
examples, from many threads. The engine's batching thread hands `score_jobs` every request waiting at once. Their
distinct prompts form a prefix tree (`_plan`): a prefix that saves at least `MIN_SHARED_TOKENS` positions becomes a
segment of its own, run once with its keys and values kept, and what follows it (the rest of each prompt, or a
longer prefix some of them share) runs over that cache. The tree runs level by level, each level's segments in as
few forward passes as the budgets allow: segments right-padded to the longest, their parents' caches gathered side by
side (padded too), the attention mask hiding every padding column and position ids counting real tokens only. A
prefix followed only by prompts' short last parts (a question's options) runs them in its own row, after it, each
seeing the prefix and itself only (a 4D mask, `_tree_mask`): a context and its options are then one row of one pass,
with no cache kept, gathered and concatenated for each option (on a GPU that copying took more device time than the
model's matrix products). So a prompt's numbers are those of its own tokens over its own prefix whatever its batch
mates (float32: equal to the prompt alone within 1e-5).

Log-probabilities come from the logits a chunk of positions at a time: the chosen token's logit and the top-k, less
the position's logsumexp, and the chosen token's rank (vLLM's: how many tokens are at least as likely); no
log-softmax over the vocabulary is built. A pass's numbers stay on the device until the
pass is done and cross to the host in one copy: on a GPU the model's compute is cheap, and a copy (a wait for the
device) and a Python loop per chunk or per position would bound the requests a second.

Memory: on CUDA a pass's new tokens and a chunk's positions are bounded by the memory free when they start (what
the device has free, split between the workers that share the GPU, plus what torch's allocator holds unused), so
that scoring beside a full KV cache or other processes on the GPU plans within what is there. A pass that still runs
out of memory is split in two and each half retried, down to one segment; the jobs of a segment that cannot run
alone fail with `EngineBusy` (a 503 to retry), and every other job, and every later request, goes on. The last
position of every prompt gives the distribution of the token after it too: `NextTokens` keeps its top entries, and
the engine answers a greedy one-token generation of that prompt from them (lm-evaluation-harness asks for one right
after the echoed log-probabilities) instead of a second pass over the prompt.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from gunicorn_llm.engines.base import ChoiceUpdate, EngineBusy, GenerationStream, TokenLogprob
from gunicorn_llm.engines.transformers_sampling import has_penalties
from gunicorn_llm.engines.transformers_slots import supports
from gunicorn_llm.request_schema import SamplingParams

log = logging.getLogger("gunicorn.error")

# New tokens per forward pass (rows x widest segment) at most: bounds the logits tensor (tokens x vocabulary) in memory;
# on CUDA less where the free memory is less (pass_budget).
SCORING_TOKEN_BUDGET = 4096
# Rows x (gathered cache width + widest segment) per pass: bounds the parents' keys and values copied side by side.
CACHED_TOKENS_PER_NEW_TOKEN = 8
# A shared prefix gets a segment of its own (one more pass per tree level) when it saves this many positions.
MIN_SHARED_TOKENS = 32
# A shared prefix followed only by whole prompts' last parts (a question's options) runs them in its own row, after it,
# when they hold this many tokens at most: no cache kept and gathered for each of them, one pass fewer. Their
# attention grows with the row's width squared, so long ones (whole questions after shared examples) run over the
# cache instead.
PACKED_LEAF_TOKENS = 256
# Positions whose log-probabilities are taken at once: bounds the float32 copy of their logits (and its exp). On CUDA
# as many as the free memory allows, up to MAX_POSITIONS_PER_CHUNK (fewer kernel launches); elsewhere
# POSITIONS_PER_CHUNK.
POSITIONS_PER_CHUNK = 128
MAX_POSITIONS_PER_CHUNK = 4096
# The share of the free device memory that a pass's plan, or a chunk's float32 copies, may count on: the rest is left
# for what the estimates leave out (the layers' activations, the allocator's rounding) and the other threads' work.
SCORING_MEMORY_SHARE = 0.5
# After a scoring job is taken, jobs arriving less than GATHER_GAP_S apart (for GATHER_MAX_S at most, and no longer than
# the last round of scoring took: transformers_generate.py) join it: a client's burst (a question's options) reaches
# the queue over a few milliseconds, and scored apart its options would not share their context.
GATHER_GAP_S = 0.02
GATHER_MAX_S = 0.1
# The most top alternatives a request may ask for (request_schema: logprobs <= 20), kept per scored prompt's next token
NEXT_TOKEN_TOP = 20
NEXT_TOKEN_PROMPTS = 1024


class NextTokens:
    """For recently scored prompts, the likeliest tokens after them with their log-probabilities (most likely first),
    so that a greedy one-token generation of such a prompt needs no pass of its own. Thread-safe, bounded."""

    def __init__(self, capacity: int = NEXT_TOKEN_PROMPTS):
        self.capacity = capacity
        self._top: OrderedDict[bytes, tuple[list[int], list[float]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(prompt_ids: list[int]) -> bytes:
        return np.asarray(prompt_ids, dtype=np.int64).tobytes()

    def remember(self, prompt_ids: list[int], top_ids: list[int], top_logprobs: list[float]) -> None:
        key = self._key(prompt_ids)
        with self._lock:
            self._top[key] = (top_ids, top_logprobs)
            self._top.move_to_end(key)
            while len(self._top) > self.capacity:
                self._top.popitem(last=False)

    def answer(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
               interval: int = 1) -> GenerationStream | None:
        """A finished stream for a greedy request of one token whose prompt was scored; None for anything else."""
        # what the scoring saw is the model's own distribution: nothing may reshape it
        if not (params.is_greedy and params.max_tokens == 1 and not has_penalties(params)) or (
                params.logprobs or 0) > NEXT_TOKEN_TOP or params.structured_outputs is not None or (
                params.controls_tokens):
            return None
        key = self._key(prompt_ids)
        with self._lock:
            top = self._top.get(key)
            if top is None:
                return None
            self._top.move_to_end(key)
        ids, logprobs = top
        entries = None if params.logprobs is None else [
            TokenLogprob(ids[0], logprobs[0],
                         tuple(zip(ids[: params.logprobs], logprobs[: params.logprobs], strict=True)))]
        stream = GenerationStream(params.n, abort=lambda: None, interval=interval)
        reason = "stop" if ids[0] in stop_ids else "length"
        for choice in range(params.n):
            stream.publish(ChoiceUpdate(choice, [ids[0]], entries, reason))
        return stream


def take_arriving(jobs: queue.Queue, gap_s: float = GATHER_GAP_S, max_s: float = GATHER_MAX_S) -> list:
    """Jobs that reach the queue less than `gap_s` after the one before, for `max_s` at most."""
    taken = []
    deadline = time.monotonic() + max_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            taken.append(jobs.get(timeout=min(gap_s, left)))
        except queue.Empty:
            break
    return taken


@dataclass
class ScoreJob:
    """One request's prompts; `result` gets one list of TokenLogprob per prompt, in order. With `next_tokens`, each
    prompt's next-token distribution is remembered there."""

    prompts: list[list[int]]
    top: int
    result: Future = field(default_factory=Future)
    next_tokens: NextTokens | None = None


@dataclass(eq=False)
class _Prompt:
    """A distinct prompt of the jobs, scored once for every job that sent it, with the most top entries any asks."""

    ids: list[int]
    uses: list[tuple[ScoreJob, int]]  # (job, index in its prompts)
    top: int = 0
    leaf: _Segment | None = None  # its last segment; None: a prompt of one token, nothing to score

    @property
    def failed(self) -> bool:
        return all(job.result.done() for job, _ in self.uses)


@dataclass(eq=False)
class _Segment:
    """Tokens [start:end] of `prompts`, which share tokens [0:end]: one prompt's last part (a leaf), or a prefix
    shared by several with `children` after it. One row of a forward pass, over its parent's cache."""

    prompts: list[_Prompt]
    start: int
    end: int
    parent: _Segment | None
    children: list[_Segment] = field(default_factory=list)
    packed: bool = False  # its children (all leaves, short) run in its own row, after it (PACKED_LEAF_TOKENS)
    # once run: entries of tokens start..end-1 (the first scored from the parent's last position; none for token 0)
    entries: list[TokenLogprob] = field(default_factory=list)
    # a shared prefix once run: its keys and values (row `row` of its pass's cache, the columns `kv_mask` says are
    # real), and its last position's logits and logsumexp, from which each child's first token is scored
    cache: DynamicCache | None = None
    row: int = 0
    kv_mask: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    last_logsumexp: float = 0.0
    last_top: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.prompts[0].ids[self.start : self.end]

    @property
    def top(self) -> int:
        return max(prompt.top for prompt in self.prompts)

    @property
    def failed(self) -> bool:
        return all(prompt.failed for prompt in self.prompts)

    @property
    def parts(self) -> list[_Segment]:
        """What its row of a pass holds: itself, then its children where they are packed after it."""
        return [self, *self.children] if self.packed else [self]

    @property
    def width(self) -> int:
        return sum(len(part.ids) for part in self.parts)


def score_jobs(model, pad_token_id: int, jobs: list[ScoreJob], token_budget: int | None = None) -> None:
    """Score every prompt of `jobs` in shared forward passes and set each job's result (or its error: a pass that
    fails fails the jobs with prompts in it, and the others go on). `token_budget`: new tokens per pass at most
    (default: pass_budget, from the memory free now)."""
    prompts: dict[tuple[int, ...], _Prompt] = {}
    for job in jobs:
        for index, ids in enumerate(job.prompts):
            prompt = prompts.setdefault(tuple(ids), _Prompt(list(ids), []))
            prompt.uses.append((job, index))
            prompt.top = max(prompt.top, job.top)
    # A prompt of one token has nothing to score; a model whose attention is not plain causal over the whole
    # sequence (sliding windows, soft-capping) would see gathered caches' padding columns: no sharing for it.
    scored = [prompt for prompt in prompts.values() if len(prompt.ids) > 1]
    min_shared = MIN_SHARED_TOKENS if supports(model.config, max(map(len, prompts), default=0)) else None
    level = _plan(scored, min_shared)
    parents: list[_Segment] = []  # the shared prefixes the level runs over
    while level:
        _pack_leaves(level)
        budget = PassBudget.of_tokens(token_budget) if token_budget else pass_budget(model)
        passes = list(_chunks_within(_in_pass_order(level), budget))
        level = []
        for chunk in passes:
            level.extend(_run_or_split(model, pad_token_id, chunk))
        for parent in parents:  # their children have gathered what they needed
            parent.cache = None
        parents = {id(segment.parent): segment.parent for segment in level}.values()
    for job in jobs:
        if not job.result.done():
            job.result.set_result([_prompt_entries(prompts[tuple(ids)], job.top) for ids in job.prompts])


def _prompt_entries(prompt: _Prompt, top: int) -> list[TokenLogprob]:
    """A prompt's entries: its segments', from the first, with `top` alternatives each."""
    entries: list[TokenLogprob] = []
    segment = prompt.leaf
    while segment is not None:
        entries[:0] = segment.entries
        segment = segment.parent
    # a segment shared with prompts that ask for more alternatives has them all
    return [entry if len(entry.top) == top else entry._replace(top=entry.top[:top]) for entry in entries]


def _run_or_split(model, pad_token_id: int, segments: list[_Segment]) -> list[_Segment]:
    """Run the segments' pass and return their children (the next level's segments). Out of memory, each half runs on
    its own, down to one segment, whose jobs then fail alone (EngineBusy); any other error fails the jobs with
    prompts in the pass."""
    segments = [segment for segment in segments if not segment.failed]
    if not segments:
        return []
    try:
        _run_pass(model, pad_token_id, segments)
        return [child for segment in segments if not segment.packed for child in segment.children]
    except torch.OutOfMemoryError:
        pass  # split below, once this exception (whose traceback holds the pass's tensors) is gone
    except Exception as error:  # noqa: BLE001 - the error goes to the waiting requests, the loop goes on
        log.exception("scoring %d segments failed", len(segments))
        _fail(segments, error)
        return []
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed pass's blocks, for the other processes on the GPU too
    tokens = sum(segment.width for segment in segments)
    if len(segments) == 1 and segments[0].packed:  # its leaves may fit over its cache, one by one
        segments[0].packed = False
        return _run_or_split(model, pad_token_id, segments)
    if len(segments) == 1:
        log.warning("scoring: %d new tokens over a cache of %d ran out of memory alone; its requests fail (503)",
                    tokens, _cache_width(segments[0].parent))
        _fail(segments, EngineBusy(f"out of memory scoring {tokens} tokens of this prompt now; retry later, or "
                                   "send a shorter prompt"))
        return []
    log.warning("scoring: a pass of %d segments (%d new tokens) ran out of memory; running it in halves",
                len(segments), tokens)
    half = len(segments) // 2
    return _run_or_split(model, pad_token_id, segments[:half]) + _run_or_split(model, pad_token_id, segments[half:])


def _fail(segments: list[_Segment], error: Exception) -> None:
    for segment in segments:
        for prompt in segment.prompts:
            for job, _ in prompt.uses:
                if not job.result.done():
                    job.result.set_exception(error)


# -- memory ------------------------------------------------------------------------------------------------------


@dataclass
class _DeviceShare:
    """This worker's part of each GPU it scores on. Set once by the engine as it loads (share_device_memory)."""

    workers: int = 1  # workers of this server on the same GPU (--workers-per-gpu): their passes may run at once
    fraction: float = 1.0  # of each GPU's memory this worker may hold: --gpu-memory-utilization over the workers


_device_share = _DeviceShare()


def share_device_memory(workers: int, utilization: float) -> None:
    _device_share.workers = max(1, workers)
    _device_share.fraction = utilization / _device_share.workers


def free_device_bytes(device: torch.device) -> int | None:
    """What a pass may allocate on `device` now: its share of the device's free memory (the other workers' passes may
    run at once) and what torch's allocator holds unused, and never past this worker's share of the device (the rest
    is other servers' and the CUDA libraries' own: a handle that cannot be allocated kills a thread's CUDA work);
    None off CUDA (the host's memory is not planned for)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    return min(free // _device_share.workers + torch.cuda.memory_reserved(device) - allocated,
               int(total * _device_share.fraction) - allocated)


def _token_bytes(model) -> tuple[int, int]:
    """What a scoring pass holds per new token (its logits, its keys and values, kept when it is a shared prefix)
    and per gathered cache column of a row (a parent's keys and values, copied for each of its children's rows)."""
    config = model.get_text_config() if hasattr(model, "get_text_config") else model.config
    element = model.dtype.itemsize
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_per_token = config.num_hidden_layers * 2 * heads * head_dim * element
    logits_per_token = model.get_output_embeddings().weight.shape[0] * element
    return logits_per_token + cache_per_token, cache_per_token


def full_pass_bytes(model) -> int:
    """The free memory in which a pass holds the most the budgets allow: SCORING_TOKEN_BUDGET new tokens over
    CACHED_TOKENS_PER_NEW_TOKEN times as many gathered cache columns."""
    new_token, cached_token = _token_bytes(model)
    largest = SCORING_TOKEN_BUDGET * (new_token + CACHED_TOKENS_PER_NEW_TOKEN * cached_token)
    return int(largest / SCORING_MEMORY_SHARE)


@dataclass(frozen=True)
class PassBudget:
    """What one forward pass may hold: rows x its longest segment within `tokens`, rows x (its widest parent cache
    + longest segment) within `columns`, and with `bytes` (on CUDA), the rows' new tokens and gathered columns at
    their costs in bytes (_token_bytes) within it: a pass of contexts alone, with no cache to gather, may then take
    several times the tokens of one over a long shared prefix."""

    tokens: int
    columns: int
    bytes: int | None = None
    new_token_bytes: int = 0
    cached_token_bytes: int = 0

    @classmethod
    def of_tokens(cls, tokens: int) -> PassBudget:
        return cls(tokens, CACHED_TOKENS_PER_NEW_TOKEN * tokens)

    def fits(self, rows: int, width: int, cached: int) -> bool:
        return (rows * width <= self.tokens and rows * (cached + width) <= self.columns
                and (self.bytes is None
                     or rows * (width * self.new_token_bytes + cached * self.cached_token_bytes) <= self.bytes))


def pass_budget(model) -> PassBudget:
    """SCORING_TOKEN_BUDGET new tokens per pass at most, and on CUDA what SCORING_MEMORY_SHARE of the free memory
    holds (a segment that does not fit runs alone)."""
    free = free_device_bytes(model.get_input_embeddings().weight.device)
    if free is None:
        return PassBudget.of_tokens(SCORING_TOKEN_BUDGET)
    new_token, cached_token = _token_bytes(model)
    return PassBudget(SCORING_TOKEN_BUDGET, CACHED_TOKENS_PER_NEW_TOKEN * SCORING_TOKEN_BUDGET,
                      int(free * SCORING_MEMORY_SHARE), new_token, cached_token)


def _positions_per_chunk(logits: torch.Tensor) -> int:
    """Positions whose float32 logits (and their exp in logsumexp, and top-k's work) fit in the memory share."""
    free = free_device_bytes(logits.device)
    if free is None:
        return POSITIONS_PER_CHUNK
    per_position = 3 * logits.shape[-1] * 4
    return max(1, min(MAX_POSITIONS_PER_CHUNK, int(free * SCORING_MEMORY_SHARE / per_position)))


# -- the plan: a prefix tree of segments ----------------------------------------------------------------------------


def _plan(prompts: list[_Prompt], min_shared: int | None) -> list[_Segment]:
    """The tree's first level: segments from token 0 (every prompt alone when `min_shared` is None)."""
    if min_shared is None:
        return [_leaf(prompt, 0, None) for prompt in prompts]
    return _segments(prompts, None, 0, 0, min_shared)


def _leaf(prompt: _Prompt, start: int, parent: _Segment | None) -> _Segment:
    prompt.leaf = _Segment([prompt], start, len(prompt.ids), parent)
    return prompt.leaf


def _segments(prompts: list[_Prompt], parent: _Segment | None, start: int, probe: int, min_shared: int
              ) -> list[_Segment]:
    """Segments from `start` (the parent's end) for prompts that share tokens [0:probe] and are longer: prompts that
    share enough tokens beyond `start` get a segment for them, with their own segments after it."""
    groups: dict[int, list[_Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.ids[probe], []).append(prompt)
    segments = []
    for group in groups.values():
        # A prompt that ends here is a leaf (distinct prompts: one being another's prefix); the others share tokens
        # up to `end`, and each keeps at least one token of its own after it.
        ending = [prompt for prompt in group if len(prompt.ids) == probe + 1]
        segments.extend(_leaf(prompt, start, parent) for prompt in ending)
        group = [prompt for prompt in group if len(prompt.ids) > probe + 1]
        if not group:
            continue
        end = min(len(os.path.commonprefix([prompt.ids for prompt in group])),
                  min(len(prompt.ids) for prompt in group) - 1)
        if len(group) > 1 and (len(group) - 1) * (end - start) >= min_shared:
            shared = _Segment(group, start, end, parent)
            shared.children = _segments(group, shared, end, end, min_shared)
            segments.append(shared)
        elif len(group) > 1 and end > probe:  # not worth a pass here; some of them may share more
            segments.extend(_segments(group, parent, start, end, min_shared))
        else:
            segments.extend(_leaf(prompt, start, parent) for prompt in group)
    return segments


def _pack_leaves(level: list[_Segment]) -> None:
    """Mark the level's shared prefixes whose children are short last parts of prompts: those run in its row."""
    for segment in level:
        segment.packed = bool(segment.children) and all(not child.children for child in segment.children) and sum(
            len(child.ids) for child in segment.children) <= PACKED_LEAF_TOKENS


def _in_pass_order(segments: list[_Segment]) -> list[_Segment]:
    """Children of one parent side by side (their cache rows gather in one run), then by width (less padding)."""
    order = {id(parent): index for index, parent in enumerate(dict.fromkeys(s.parent for s in segments))}
    return sorted(segments, key=lambda segment: (order[id(segment.parent)], segment.width))


def _chunks_within(segments: list[_Segment], budget: PassBudget):
    """Consecutive groups whose padded size stays within the budget (a segment that alone exceeds it: alone)."""
    chunk: list[_Segment] = []
    width = cached = 0
    for segment in segments:
        new_width = max(width, segment.width)
        new_cached = max(cached, _cache_width(segment.parent))
        if chunk and not budget.fits(len(chunk) + 1, new_width, new_cached):
            yield chunk
            chunk, new_width, new_cached = [], segment.width, _cache_width(segment.parent)
        chunk.append(segment)
        width, cached = new_width, new_cached
    if chunk:
        yield chunk


def _cache_width(parent: _Segment | None) -> int:
    return 0 if parent is None else parent.kv_mask.shape[0]


# -- one forward pass -----------------------------------------------------------------------------------------------


@torch.inference_mode()
def _run_pass(model, pad_token_id: int, segments: list[_Segment]) -> None:
    device = model.get_input_embeddings().weight.device
    lengths = [segment.width for segment in segments]
    width = max(lengths)
    rows = list(zip(segments, lengths, strict=True))
    input_ids = torch.tensor([[token for part in segment.parts for token in part.ids] + [pad_token_id] * (width - n)
                              for segment, n in rows], device=device)
    new_mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    parents = [segment.parent for segment in segments]
    cache, kv_mask = _gathered_cache(parents, device) if parents[0] is not None else (None, None)
    mask = new_mask if kv_mask is None else torch.cat([kv_mask, new_mask], dim=1)
    # each part's tokens at their own positions (a packed leaf's right after its prefix's), padding's anywhere
    positions = torch.tensor([[part.start + i for part in segment.parts for i in range(len(part.ids))]
                              + [0] * (width - n) for segment, n in rows], device=device)
    attention = _tree_mask(segments, mask) if any(segment.packed for segment in segments) else mask
    keep = any(segment.children and not segment.packed for segment in segments)
    output = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                   use_cache=keep)
    logits = output.logits  # [rows, width, vocabulary], the model's dtype
    _score_positions(logits, segments)
    for row, segment in enumerate(segments):
        if segment.children and not segment.packed:
            segment.cache, segment.row = output.past_key_values, row
            segment.kv_mask = mask[row, : mask.shape[1] - width + lengths[row]]


def _tree_mask(segments: list[_Segment], columns: torch.Tensor) -> torch.Tensor:
    """The attention mask [rows, 1, width, cached + width] of a pass with packed rows: a real position sees the real
    cached columns (`columns`: 1 where real), and in its row the earlier positions of the row's prefix (part 0) and
    of its own part. Padding positions see the prefix (a row with nothing to see would give NaN); nobody reads them."""
    rows, total = columns.shape
    width = max(segment.width for segment in segments)
    part_of = torch.tensor([[index for index, part in enumerate(segment.parts) for _ in part.ids]
                            + [-1] * (width - segment.width) for segment in segments], device=columns.device)
    index = torch.arange(width, device=columns.device)
    earlier = index[None, :] <= index[:, None]  # [query, key]
    own = (part_of[:, None, :] == part_of[:, :, None]) | (part_of[:, None, :] == 0)  # [row, query, key]
    real = columns.bool()[:, None, :]  # [row, 1, column]
    cached = total - width
    visible = torch.cat([real[:, :, :cached].expand(rows, width, cached), earlier & own & real[:, :, cached:]], dim=2)
    return visible[:, None]


def _gathered_cache(parents: list[_Segment], device) -> tuple[DynamicCache, torch.Tensor]:
    """The parents' keys and values side by side, one row per child (a parent's row repeated for each of its
    children), padded to the widest; and the mask of their real columns."""
    width = max(parent.kv_mask.shape[0] for parent in parents)
    runs: list[tuple[DynamicCache, list[int]]] = []  # consecutive rows from one pass's cache
    for parent in parents:
        if runs and runs[-1][0] is parent.cache:
            runs[-1][1].append(parent.row)
        else:
            runs.append((parent.cache, [parent.row]))
    layers = []
    for layer in range(len(parents[0].cache.layers)):
        keys, values = [], []
        for cache, rows in runs:
            index = torch.tensor(rows, device=device)
            for source, out in ((cache.layers[layer].keys, keys), (cache.layers[layer].values, values)):
                part = source[index, :, :width]  # indexing: index_select is far slower on CPU (measured 10x)
                out.append(part if part.shape[2] == width else F.pad(part, (0, 0, 0, width - part.shape[2])))
        layers.append((keys[0], values[0]) if len(runs) == 1 else (torch.cat(keys), torch.cat(values)))
    mask = torch.stack([F.pad(parent.kv_mask, (0, width - parent.kv_mask.shape[0]))
                        for parent in parents])
    return DynamicCache(layers), mask


def _score_positions(logits: torch.Tensor, segments: list[_Segment]) -> None:
    """Each part's entries (a row's segment, and the leaves packed after it: their first token scored from the
    segment's last position), a segment's last position kept for its children where they run over its cache, a
    leaf's remembered as its prompt's next token. The numbers cross to the host once per kind, for the whole pass."""
    rows, width, vocab = logits.shape
    flat = logits.view(rows * width, vocab)
    positions, targets, tops = [], [], []
    lasts: list[tuple[_Segment, int]] = []  # parts whose last position's distribution is kept or remembered
    for row, segment in enumerate(segments):
        at = row * width
        for index, part in enumerate(segment.parts):
            if index:  # a packed leaf's first token, after its prefix (part 0)
                positions.append(row * width + len(segment.ids) - 1)
                targets.append(part.ids[0])
                tops.append(part.top)
            # every position but the part's last predicts its next token
            count = len(part.ids) - 1
            positions.extend(range(at, at + count))
            targets.extend(part.prompts[0].ids[part.start + 1 : part.end])
            tops.extend([part.top] * count)
            at += len(part.ids)
            if not part.children or not part.packed:
                lasts.append((part, at - 1))
    entries = _entries(flat, positions, targets, tops)
    firsts = iter(_first_entries([segment for segment in segments if segment.parent is not None]))
    taken = 0
    for segment in segments:
        for index, part in enumerate(segment.parts):
            first = [next(firsts)] if index == 0 and segment.parent is not None else []
            count = len(part.ids) - (index == 0)
            part.entries = first + entries[taken : taken + count]
            taken += count
    last = flat[torch.tensor([at for _, at in lasts], device=logits.device)].float()
    logsumexp = torch.logsumexp(last, dim=-1)
    top_values, top_ids = last.topk(min(NEXT_TOKEN_TOP, vocab), dim=-1)
    top_values = (top_values - logsumexp[:, None]).tolist()
    top_ids = top_ids.tolist()
    logsumexps = logsumexp.tolist()
    for row, (part, _) in enumerate(lasts):
        if part.children:
            part.last_logits, part.last_logsumexp = last[row], logsumexps[row]
            part.last_top = list(zip(top_ids[row], top_values[row], strict=True))
        else:
            for job, _ in part.prompts[0].uses:
                if job.next_tokens is not None:
                    job.next_tokens.remember(part.prompts[0].ids, top_ids[row], top_values[row])
                    break


def _first_entries(segments: list[_Segment]) -> list[TokenLogprob]:
    """Each segment's first token, from its parent's last position (all of them gathered in one copy)."""
    if not segments:
        return []
    last_logits = torch.stack([segment.parent.last_logits for segment in segments])
    tokens = [segment.prompts[0].ids[segment.start] for segment in segments]
    chosen = last_logits.gather(-1, torch.tensor(tokens, device=last_logits.device)[:, None])
    ranks = (last_logits >= chosen).sum(dim=-1).tolist()  # vLLM's rank: tokens at least as likely
    entries = []
    for segment, token, logit, rank in zip(segments, tokens, chosen.squeeze(-1).tolist(), ranks, strict=True):
        parent, top = segment.parent, segment.top
        value = logit - parent.last_logsumexp
        if top > len(parent.last_top):
            values, ids = parent.last_logits.topk(top)
            alternatives = tuple(zip(ids.tolist(), (values - parent.last_logsumexp).tolist(), strict=True))
        else:
            alternatives = tuple(parent.last_top[:top])
        entries.append(TokenLogprob(token, value, alternatives, rank))
    return entries


def _entries(flat: torch.Tensor, positions: list[int], targets: list[int], tops: list[int]) -> list[TokenLogprob]:
    """TokenLogprob of each position's target token, its rank and its top alternatives: computed a chunk of
    positions at a time on the device, copied to the host once."""
    if not positions:
        return []
    index = torch.tensor(positions, device=flat.device)
    target = torch.tensor(targets, device=flat.device)[:, None]
    most = max(tops)
    per_chunk = _positions_per_chunk(flat)
    values, ids, ranks = [], [], []  # per chunk: [chosen, top values...] (log-probabilities), top ids, ranks
    for at in range(0, len(positions), per_chunk):
        logits = flat[index[at : at + per_chunk]].float()  # a copy of these positions only (index_select: 70x
        logsumexp = torch.logsumexp(logits, dim=-1, keepdim=True)  # slower on CPU here)
        top_values, top_ids = logits.topk(most, dim=-1)
        chosen = logits.gather(-1, target[at : at + per_chunk])
        ranks.append((logits >= chosen).sum(dim=-1))  # vLLM's rank: tokens at least as likely
        values.append(torch.cat([chosen, top_values], dim=1) - logsumexp)
        ids.append(top_ids)
        del logits  # before the next chunk's copy
    values = torch.cat(values).tolist()
    ids = torch.cat(ids).tolist()
    ranks = torch.cat(ranks).tolist()
    return [TokenLogprob(token, row[0], tuple(zip(row_ids[:top], row[1 : top + 1], strict=True)), rank)
            for token, row, row_ids, top, rank in zip(targets, values, ids, tops, ranks, strict=True)]
