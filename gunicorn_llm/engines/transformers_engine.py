"""The Hugging Face transformers engine, and the WSGI app gunicorn serves with `--infer_type transformers`.

Concurrent generations of a worker are served together, on one of these paths:

- slot batching (transformers_slots.py), the default on one GPU, for every generation request;
- continuous batching (transformers' own manager, transformers_continuous.py), for models slot batching does not
  support, for requests whose sampling it supports;
- batched `generate`: request threads queue their work, one batching thread takes everything waiting, groups it
  by sampling parameters and runs each group as one batched `generate`. The default on CPU, where it measured far
  faster (docs/benchmarks.md), and the path for what continuous batching cannot do. A step observer publishes
  every row's new token as it is sampled, so this path streams too, and ends a row as soon as its client cancels.
  Sampling transforms are applied by this module's own processor list, so the model's log-probabilities (before
  any transform) can be reported, as vLLM reports them. Requests with a `seed` run as a batch of their own, so the
  same request with the same seed gives the same text whatever else the server is doing.

A greedy request's `seed` is dropped on arrival: it draws nothing, and must not split it from its batch. Prompt
log-probabilities go to the batching thread too, where every request waiting is scored in shared forward passes
(transformers_scoring.py); a greedy one-token generation of a prompt scored a moment ago is answered from that
scoring. Which path served each prompt is counted in /metrics.

The HTTP side lives in http/app.py; text (decoding, stop strings) in generation.py; this file only drives the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gunicorn_llm.engines.base import ChoiceUpdate, Engine, EngineDied, GenerationStream, TokenLogprob, wait_for
from gunicorn_llm.engines.transformers_continuous import ContinuousBatching
from gunicorn_llm.engines.transformers_sampling import presence_frequency_penalized, token_logprobs
from gunicorn_llm.engines.transformers_scoring import NextTokens, ScoreJob, score_jobs, take_arriving
from gunicorn_llm.engines.transformers_slots import SlotBatching, supports
from gunicorn_llm.ops import metrics
from gunicorn_llm.request_schema import SamplingParams
from gunicorn_llm.settings import ServerSettings

log = logging.getLogger("gunicorn.error")

# What /ready and /metrics call each continuous path (--batching's values); none of them: "generate"
BATCHING_NAMES = {SlotBatching: "slots", ContinuousBatching: "continuous"}
# --max-batch-size's defaults: rows per batched generate (CPU memory and latency), and slot batching's sequences per
# worker (on GPU; within --threads 256 with --max-waiting 64 more)
GENERATE_BATCH_SIZE = 32
SLOTS_PER_WORKER = 128
# Share of the free device memory (after the weights) that continuous batching may take for its KV cache; the rest
# is headroom for the batched-generate path and vocabulary-sized temporaries.
KV_CACHE_MEMORY_SHARE = 0.7
# The slots' KV cache: on GPU it leaves this much of the worker's share for activations, CUDA graphs and logits; on
# CPU it is this size (sized from the host's free memory it would take most of it).
ACTIVATION_HEADROOM_BYTES = 1 << 30
SLOT_CACHE_BYTES_ON_CPU = 1 << 30


@dataclass
class GenerateJob:
    prompt_ids: list[int]
    params: SamplingParams
    stream: GenerationStream


@dataclass
class _Row:
    job: GenerateJob
    choice: int
    done: bool = False


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI/vLLM presence and frequency penalties, counted over the generated tokens only."""

    def __init__(self, presence: float, frequency: float, prompt_width: int):
        self.presence = presence
        self.frequency = frequency
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return presence_frequency_penalized(scores, counts, self.presence, self.frequency)


class _StepObserver(StoppingCriteria):
    """Watches a batched `generate` step by step, as its stopping criterion: publishes every live row's new token
    (with its log-probability, recorded by `_RawLogprobs`), and ends rows that hit a stop token, their length, or
    were cancelled."""

    def __init__(self, rows: list[_Row], prompt_width: int, params: SamplingParams, stop_ids: frozenset[int],
                 engine: Engine):
        self.engine = engine
        self.rows = rows
        self.prompt_width = prompt_width
        self.params = params
        self.stop_ids = stop_ids
        self.step_logprobs: torch.Tensor | None = None
        self.live_rows = len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.engine.step_taken()
        return self._observe(input_ids)

    def _observe(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        tokens = input_ids[:, -1].tolist()
        logprobs = self._logprobs(tokens) if self.step_logprobs is not None else None
        done = []
        for index, (row, token) in enumerate(zip(self.rows, tokens)):
            if not row.done:
                if row.job.stream.cancelled:
                    row.done = True
                else:
                    reason = "stop" if token in self.stop_ids else "length" if generated >= self.params.max_tokens else None
                    row.done = reason is not None
                    entry = [logprobs[index]] if logprobs is not None else None
                    row.job.stream.publish(ChoiceUpdate(row.choice, [token], entry, reason))
            done.append(row.done)
        self.live_rows = done.count(False)
        return torch.tensor(done, device=input_ids.device)

    def end_open_rows(self) -> None:
        """Finish the rows generate() left open when it returned: their streams close, as "length" since no stop
        token ended them."""
        for row in self.rows:
            if not row.done:
                row.done = True
                row.job.stream.publish(ChoiceUpdate(row.choice, [], None, "length"))
        self.live_rows = 0

    def _logprobs(self, tokens: list[int]) -> list[TokenLogprob]:
        return token_logprobs(self.step_logprobs, torch.tensor(tokens, device=self.step_logprobs.device),
                              [self.params.logprobs] * len(tokens))


class _RawLogprobs(LogitsProcessor):
    """First among the logits processors: keeps the model's own log-probabilities of the step for the observer."""

    def __init__(self, observer: _StepObserver):
        self.observer = observer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.observer.step_logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class TransformersEngine(Engine):
    def __init__(self, model_path: str, model_name: str, settings: ServerSettings):
        self.model_name = model_name
        self.max_batch_size = settings.max_batch_size or GENERATE_BATCH_SIZE
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=settings.trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        on_gpu = torch.cuda.is_available()
        dtype = settings.weights_dtype(on_gpu)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            # Over several GPUs of the slice accelerate places the layers; on one, everything goes to that GPU.
            device_map=("auto" if settings.per_proc_gpus > 1 else {"": 0}) if on_gpu else None,
            trust_remote_code=settings.trust_remote_code,
        ).eval()
        self.device = self.model.get_input_embeddings().weight.device
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # Only the token ids stay: the checkpoint's sampling defaults must never leak into a request, and generate()
        # fills every setting a request leaves unset from this config.
        # No eos_token_id either: generate() would stop a row at EOS by itself, also when the request ignores EOS;
        # the step observer ends rows instead (each request's own stop tokens).
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.max_model_len = settings.max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
        self.stream_interval = settings.stream_interval
        self.continuous = self._continuous_batching(settings)
        self.scored_next_tokens = NextTokens()  # what comes after recently scored prompts
        self._jobs: queue.Queue = queue.Queue()
        self._observer: _StepObserver | None = None  # the batched generate running now, if any
        threading.Thread(target=self._run_batches, name="batcher", daemon=True).start()

    def _continuous_batching(self, settings: ServerSettings) -> SlotBatching | ContinuousBatching | None:
        # Both keep their cache on one device: a model spread over a multi-GPU slice serves via batched generate.
        devices = {str(d) for d in getattr(self.model, "hf_device_map", {"": self.device}).values()}
        wanted = settings.batching in ("slots", "continuous") or (
            settings.batching == "auto" and self.device.type == "cuda")
        if wanted and len(devices) > 1:
            log.warning("worker %s: the model spans several GPUs; serving with batched generate", os.getpid())
        if not wanted or len(devices) > 1:
            return None
        slots_fit = supports(self.model.config, self.max_model_len)
        if settings.batching == "slots" and not slots_fit:
            raise RuntimeError("--batching slots needs plain causal attention over the whole sequence; this model "
                               "has sliding windows, soft-capping or mixed layer types: use --batching continuous")
        if settings.batching == "slots" or (settings.batching == "auto" and slots_fit):
            return SlotBatching(self.model, settings.max_batch_size or SLOTS_PER_WORKER, self.max_model_len,
                                self._slot_cache_bytes(settings),
                                cuda_graphs=self.device.type == "cuda" and not settings.enforce_eager,
                                on_death=self.die, on_step=self.step_taken, stream_interval=settings.stream_interval)
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # Instances sharing a GPU (--workers-per-gpu) split the memory the cache may take.
        memory_share = KV_CACHE_MEMORY_SHARE / settings.workers_per_gpu
        return ContinuousBatching(self.model, self.tokenizer.pad_token_id, vocab_size, memory_share, self.die,
                                  cuda_graphs=settings.cuda_graphs and self.device.type == "cuda",
                                  stream_interval=settings.stream_interval)

    def _slot_cache_bytes(self, settings: ServerSettings) -> int:
        """What the slots' KV cache may take: this worker's share of the GPU (--gpu-memory-utilization over
        --workers-per-gpu) less what it holds already (the weights) and room for activations; no more than is free."""
        if self.device.type != "cuda":
            return SLOT_CACHE_BYTES_ON_CPU
        free, total = torch.cuda.mem_get_info(self.device)
        share = settings.gpu_memory_utilization * total / settings.workers_per_gpu - torch.cuda.memory_allocated(
            self.device)
        return int(min(share, free) - ACTIVATION_HEADROOM_BYTES)

    def close(self) -> None:
        """Stop the continuous-batching manager's loop (its thread is not a daemon); the other paths' threads are."""
        if isinstance(self.continuous, ContinuousBatching):
            self.continuous.close()

    def running(self) -> int:
        observer = self._observer
        return (observer.live_rows if observer else 0) + (self.continuous.running() if self.continuous else 0)

    def describe(self) -> dict:
        placed_on = sorted({str(device) for device in getattr(self.model, "hf_device_map", {}).values()})
        return {
            "model": self.model_name,
            "engine": "transformers",
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
            # What this worker can see: only its own slice's GPUs (the dispatcher pinned them before loading).
            "visible_gpus": torch.cuda.device_count(),
            "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "layers_on": placed_on or [str(self.device)],
            "batching": BATCHING_NAMES.get(type(self.continuous), "generate"),
            **({"slots": self.continuous.slots} if isinstance(self.continuous, SlotBatching) else {}),
            "running": self.running(),
        }

    # -- the interface the layers above call (from many threads) ---------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        if params.is_greedy and params.seed is not None:  # it draws nothing: it must not split a batch
            params = params.model_copy(update={"seed": None})
        stop_ids = frozenset(params.stop_token_ids or ()) | frozenset(() if params.ignore_eos else self.eos_token_ids)
        # lm-evaluation-harness asks for one greedy token after each prompt it scored: known already
        answered = self.scored_next_tokens.answer(prompt_ids, params, stop_ids, self.stream_interval)
        if answered is not None:
            metrics.engine_path_taken("scored")
            return answered
        if self.continuous is not None and self.continuous.can_serve(params):
            metrics.engine_path_taken(BATCHING_NAMES[type(self.continuous)])
            return self.continuous.start(prompt_ids, params, stop_ids)
        metrics.engine_path_taken("generate")
        # the step observer sees `cancelled` and ends rows
        stream = GenerationStream(params.n, abort=lambda: None, interval=self.stream_interval)
        self._jobs.put(GenerateJob(prompt_ids, params, stream))
        return stream

    def prompt_logprobs(self, prompts: list[list[int]], top: int = 0, deadline: float | None = None):
        metrics.engine_path_taken("prompt_logprobs", len(prompts))
        job = ScoreJob(prompts, top, next_tokens=self.scored_next_tokens)
        self._jobs.put(job)
        return wait_for(job.result, deadline)

    # -- the batching thread ---------------------------------------------------------------------------------

    def _run_batches(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while True:  # take everything else already waiting: it runs in the same batches
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if any(isinstance(job, ScoreJob) for job in jobs):  # the rest of a scoring burst is on its way
                jobs += take_arriving(self._jobs)
            with self.continuous.paused() if self.continuous else contextlib.nullcontext():
                scoring = [job for job in jobs if isinstance(job, ScoreJob)]
                if scoring:
                    score_jobs(self.model, self.tokenizer.pad_token_id, scoring)
                groups: dict[SamplingParams, list[GenerateJob]] = {}
                for job in (job for job in jobs if isinstance(job, GenerateJob)):
                    if job.params.seed is not None:  # never batched with others: that keeps it reproducible
                        self._generate_group([job])
                    else:
                        groups.setdefault(job.params, []).append(job)
                for group in groups.values():
                    self._generate_group(group)

    def _generate_group(self, jobs: list[GenerateJob]) -> None:
        params = jobs[0].params
        rows = [_Row(job, choice) for job in jobs for choice in range(params.n)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            try:
                self._generate_rows(chunk, params)
            except Exception as error:  # noqa: BLE001 - the error goes to the waiting requests, the loop goes on
                log.exception("batch of %d sequences failed", len(chunk))
                for row in chunk:
                    row.job.stream.fail(error)
                if isinstance(error, EngineDied):
                    self.die(error)

    @torch.inference_mode()
    def _generate_rows(self, rows: list[_Row], params: SamplingParams) -> None:
        rows = [row for row in rows if not row.job.stream.cancelled]
        if not rows:
            return
        inputs = self.tokenizer.pad({"input_ids": [row.job.prompt_ids for row in rows]}, return_tensors="pt")
        inputs = inputs.to(self.device)
        prompt_width = inputs["input_ids"].shape[1]
        stop_ids = frozenset(params.stop_token_ids or ()) | frozenset(() if params.ignore_eos else self.eos_token_ids)
        observer = self._observer = _StepObserver(rows, prompt_width, params, stop_ids, self)
        try:
            self._generate_with(observer, inputs, params, prompt_width)
            observer.end_open_rows()  # whatever made generate() return early, no client waits for more
        finally:  # an error goes to the rows' streams in _generate_group
            self._observer = None

    def _generate_with(self, observer: _StepObserver, inputs, params: SamplingParams, prompt_width: int) -> None:
        self.model.generate(
            **inputs,
            generation_config=GenerationConfig(
                max_new_tokens=params.max_tokens,
                do_sample=not params.is_greedy,
                # Neutral values: the transforms below are this module's own processors, in vLLM's order.
                temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                eos_token_id=None,  # the observer ends rows; generate() stops once every row has ended
                pad_token_id=self.tokenizer.pad_token_id,
            ),
            logits_processor=self._sampling_processors(params, prompt_width, observer),
            stopping_criteria=StoppingCriteriaList([observer]),
        )

    @staticmethod
    def _sampling_processors(params: SamplingParams, prompt_width: int, observer) -> LogitsProcessorList:
        processors: list = [_RawLogprobs(observer)] if params.logprobs is not None else []
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_width))
        if not params.is_greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0.0:
                processors.append(MinPLogitsWarper(params.min_p))
        return LogitsProcessorList(processors)

