"""The batched-`generate` path of the transformers engine, and the thread that scores prompts.

Request threads queue their work; one batching thread takes everything waiting, groups it by sampling parameters and
runs each group as one batched `generate`. A structured-output constraint does not split a group: each constrained
row has its own grammar matcher (grammars.py), which masks the row's logits first among the processors and ends the
row when its grammar does; a request's token controls (token_controls.py: logit bias, allowed ids, bad words,
min_tokens) are part of its group's sampling and are applied per row after the log-probabilities are taken. It is
the default on CPU, where it measured far faster
(docs/benchmarks.md), the path for a model spread over several GPUs, and the path for what continuous batching
cannot do. A step observer publishes every row's new token as it is sampled, so this path streams too, and ends a
row as soon as its client cancels. Sampling transforms are applied by this module's own processor list, so the
model's log-probabilities (before any transform) can be reported, as vLLM reports them. Requests with a `seed` run
as a batch of their own, so the same request with the same seed gives the same text whatever else the server is
doing.

Prompt log-probabilities go to the same thread, where every request waiting is scored in shared forward passes
(transformers_scoring.py). While the thread runs, the continuous path beside it (if any) pauses, keeping its batch.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import (
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

from gunicorn_llm.engines.base import ChoiceUpdate, EngineDied, GenerationStream, TokenLogprob
from gunicorn_llm.engines.grammars import Grammars, advance, mask_logits, new_matcher
from gunicorn_llm.engines.token_controls import TokenControls
from gunicorn_llm.engines.transformers_batching import BatchingPath, ContinuousPath
from gunicorn_llm.engines.transformers_sampling import presence_frequency_penalized, token_logprobs
from gunicorn_llm.engines.transformers_scoring import GATHER_MAX_S, NextTokens, ScoreJob, score_jobs, take_arriving
from gunicorn_llm.engines.transformers_slots import set_up_cuda_thread
from gunicorn_llm.request_schema import SamplingParams

log = logging.getLogger("gunicorn.error")


@dataclass
class GenerateJob:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    stream: GenerationStream
    controls: TokenControls | None = None  # equal params, equal controls: a group's rows share them


@dataclass
class _Row:
    job: GenerateJob
    choice: int
    matcher: object | None = None  # a constrained row's xgrammar matcher (grammars.py)
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
                 on_step):
        self.on_step = on_step
        self.rows = rows
        self.prompt_width = prompt_width
        self.params = params
        self.stop_ids = stop_ids
        self.step_logprobs: torch.Tensor | None = None
        self.live_rows = len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.on_step()
        return self._observe(input_ids)

    def _observe(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        tokens = input_ids[:, -1].tolist()
        logprobs = self._logprobs(tokens) if self.step_logprobs is not None else None
        done = []
        for index, (row, token) in enumerate(zip(self.rows, tokens, strict=False)):
            if not row.done:
                if row.job.stream.cancelled:
                    row.done = True
                else:
                    reason = ("stop" if advance(row.matcher, token) or token in self.stop_ids
                              else "length" if generated >= self.params.max_tokens else None)
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


class _GrammarMask(LogitsProcessor):
    """First among the logits processors: each constrained row still running keeps only the tokens its grammar
    allows next (the observer advances the matchers with the tokens drawn)."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask_logits(scores, [None if row.done else row.matcher for row in self.rows])
        return scores


class _TokenControls(LogitsProcessor):
    """After the log-probabilities are taken: each row still running under its request's token controls."""

    def __init__(self, rows: list[_Row], prompt_width: int):
        self.rows = rows
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_width
        for index, row in enumerate(self.rows):
            controls = row.job.controls
            if controls is None or row.done:
                continue
            recent = input_ids[index, input_ids.shape[1] - min(controls.context, generated):].tolist() \
                if controls.context and generated else []
            controls.apply(scores[index], generated, recent)
        return scores


class BatchedGenerate(BatchingPath):
    name = "generate"

    def __init__(self, model, tokenizer, max_batch_size: int, beside: ContinuousPath | None, on_death, on_step,
                 stream_interval: int = 1, grammars: Grammars | None = None):
        """`tokenizer`: pads prompts on the left; `max_batch_size`: rows per `generate` call; `beside`: the
        continuous path paused while this thread runs; `on_death(error)`: called when a step raises EngineDied;
        `on_step()`: called once per generation step; `stream_interval`: tokens per streamed update
        (GenerationStream); `grammars`: the compiled structured-output constraints (needed for requests that have
        one)."""
        self.grammars = grammars
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_input_embeddings().weight.device
        self.max_batch_size = max_batch_size
        self.beside = beside
        self.on_death = on_death
        self.on_step = on_step
        self.stream_interval = stream_interval
        self._jobs: queue.Queue = queue.Queue()
        self._observer: _StepObserver | None = None  # the batched generate running now, if any
        self._last_scoring_s = GATHER_MAX_S  # how long the last round of scoring took
        threading.Thread(target=self._run_batches, name="batcher", daemon=True).start()

    @staticmethod
    def can_serve(params: SamplingParams) -> bool:
        """Every generation request."""
        return True

    def start(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
              controls: TokenControls | None = None) -> GenerationStream:
        # the step observer sees `cancelled` and ends rows
        stream = GenerationStream(params.n, abort=lambda: None, interval=self.stream_interval)
        self._jobs.put(GenerateJob(prompt_ids, params, stop_ids, stream, controls))
        return stream

    def score(self, prompts: list[list[int]], top: int, next_tokens: NextTokens | None = None) -> Future:
        """Each prompt's token log-probabilities (transformers_scoring.py), scored with whatever else is waiting;
        `next_tokens` keeps what each scored prompt would generate next."""
        job = ScoreJob(prompts, top, next_tokens=next_tokens)
        self._jobs.put(job)
        return job.result

    def running(self) -> int:
        observer = self._observer
        return observer.live_rows if observer else 0

    # -- the batching thread ---------------------------------------------------------------------------------

    def _run_batches(self) -> None:
        try:
            set_up_cuda_thread(self.device)
        except Exception as error:  # noqa: BLE001 - nothing could run on this thread: the worker is replaced
            self.on_death(error)
            return
        while True:
            jobs = [self._jobs.get()]
            while True:  # take everything else already waiting: it runs in the same batches
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                self._run_round(jobs)
            except Exception as error:  # noqa: BLE001 - a fault of one round fails its requests, the next goes on
                log.exception("a batching round of %d requests failed", len(jobs))
                for job in jobs:
                    if isinstance(job, ScoreJob):
                        if not job.result.done():
                            job.result.set_exception(error)
                    else:
                        job.stream.fail(error)  # after a finished answer: never read

    def _run_round(self, jobs: list) -> None:
        if any(isinstance(job, ScoreJob) for job in jobs):  # the rest of a scoring burst is on its way
            # waiting longer than a round of scoring takes (on a GPU, tens of milliseconds) would cost more than
            # scoring a late option's context again; extended in place: a failed round fails these too
            jobs.extend(take_arriving(self._jobs, max_s=min(GATHER_MAX_S, self._last_scoring_s)))
        with self.beside.paused() if self.beside else contextlib.nullcontext():
            scoring = [job for job in jobs if isinstance(job, ScoreJob)]
            if scoring:
                started = time.monotonic()
                score_jobs(self.model, self.tokenizer.pad_token_id, scoring)
                self._last_scoring_s = time.monotonic() - started
            groups: dict[SamplingParams, list[GenerateJob]] = {}
            for job in (job for job in jobs if isinstance(job, GenerateJob)):
                if job.params.seed is not None:  # never batched with others: that keeps it reproducible
                    self._generate_group([job])
                else:  # each row's constraint is its own matcher's: it does not split a batch
                    groups.setdefault(job.params.model_copy(update={"structured_outputs": None}), []).append(job)
            for group in groups.values():
                self._generate_group(group)

    def _generate_group(self, jobs: list[GenerateJob]) -> None:
        params = jobs[0].params.model_copy(update={"structured_outputs": None})  # the rows' sampling, shared
        rows = [_Row(job, choice, new_matcher(self.grammars, job.params.structured_outputs))
                for job in jobs for choice in range(params.n)]
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
                    self.on_death(error)

    @torch.inference_mode()
    def _generate_rows(self, rows: list[_Row], params: SamplingParams) -> None:
        rows = [row for row in rows if not row.job.stream.cancelled]
        if not rows:
            return
        inputs = self.tokenizer.pad({"input_ids": [row.job.prompt_ids for row in rows]}, return_tensors="pt")
        inputs = inputs.to(self.device)
        prompt_width = inputs["input_ids"].shape[1]
        # equal sampling parameters, so equal stop tokens: the first row's are everyone's
        observer = self._observer = _StepObserver(rows, prompt_width, params, rows[0].job.stop_ids, self.on_step)
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
    def _sampling_processors(params: SamplingParams, prompt_width: int, observer: _StepObserver
                             ) -> LogitsProcessorList:
        processors: list = [_GrammarMask(observer.rows)] if any(row.matcher for row in observer.rows) else []
        if params.logprobs is not None:
            processors.append(_RawLogprobs(observer))
        if params.controls_tokens:
            processors.append(_TokenControls(observer.rows, prompt_width))
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
