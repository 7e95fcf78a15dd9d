"""The Hugging Face transformers engine, and the WSGI app gunicorn serves with `--infer_type transformers`.

Concurrent requests of a worker are served together, on one of two paths:

- continuous batching (transformers' own manager, transformers_continuous.py), the default on GPU, for requests
  whose sampling it supports;
- batched `generate`: handler threads queue their work, one batching thread takes everything waiting, groups it
  by sampling parameters and runs each group as one batched `generate` (or, for prompt log-probabilities, one
  padded forward pass). The default on CPU, where it measured far faster (docs/benchmarks.md), and the path for
  everything continuous batching cannot do. Requests with a `seed` run as a batch of their own, so the same
  request with the same seed gives the same text whatever else the server is doing.

Either way, many instances in one request are one batch, not a loop.

The HTTP side lives in serving.py; this file only builds and drives the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from engine import Engine, truncate_at_stop
from model_store import EMBEDDED_MODEL_NAME, resolve_model
from request_schema import SamplingParams
from server_settings import ServerSettings, load_settings
from serving import create_app
from transformers_continuous import ContinuousBatching

log = logging.getLogger("gunicorn.error")

# Prompt tokens scored per forward pass: bounds the float32 logits tensor (tokens x vocabulary) in memory.
SCORING_TOKEN_BUDGET = 4096
SCORING = "score"  # the batching key of prompt-scoring work
# Share of the free device memory (after the weights) that continuous batching may take for its KV cache; the rest
# is headroom for the batched-generate path and vocabulary-sized temporaries.
KV_CACHE_MEMORY_SHARE = 0.7


@dataclass
class Job:
    prompts: list[str]
    params: SamplingParams | None  # None: score the prompts instead of generating
    result: Future = field(default_factory=Future)

    @property
    def batch_key(self):
        return SCORING if self.params is None else self.params


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
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class TransformersEngine(Engine):
    def __init__(self, model_path: str, model_name: str, settings: ServerSettings):
        self.model_name = model_name
        self.max_batch_size = settings.max_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=settings.trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=_torch_dtype(settings.weights_dtype(on_gpu=torch.cuda.is_available())),
            device_map=_device_map(settings.per_proc_gpus),
            trust_remote_code=settings.trust_remote_code,
        ).eval()
        self.device = self.model.get_input_embeddings().weight.device
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.continuous = None
        # Continuous batching keeps one paged cache on one device; a model spread over a multi-GPU slice by
        # accelerate serves through batched generate.
        single_device = len({str(d) for d in getattr(self.model, "hf_device_map", {"": self.device}).values()}) == 1
        wanted = settings.batching == "continuous" or (settings.batching == "auto" and self.device.type == "cuda")
        if wanted and not single_device:
            log.warning("worker %s: the model spans several GPUs; serving with batched generate", os.getpid())
        if wanted and single_device:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            # Instances sharing a GPU (--workers-per-gpu) split the memory the cache may take.
            memory_share = KV_CACHE_MEMORY_SHARE / settings.workers_per_gpu
            self.continuous = ContinuousBatching(self.model, self.tokenizer.pad_token_id, vocab_size, memory_share)
        self._jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._run_batches, name="batcher", daemon=True).start()

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
            "batching": "continuous" if self.continuous else "generate",
        }

    # -- the interface the HTTP layer calls (from many threads) ----------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        if self.continuous is not None and ContinuousBatching.can_serve(params):
            stop_ids = self._stop_ids(params)
            prompt_ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
            tokens = self.continuous.generate(prompt_ids, params, stop_ids)
            return [[self._decode(choice, stop_ids, params) for choice in choices] for choices in tokens]
        return self._submit(Job(prompts, params))

    def prompt_logprobs(self, prompts: list[str]) -> list[list[float]]:
        return self._submit(Job(prompts, None))

    def _submit(self, job: Job):
        self._jobs.put(job)
        return job.result.result()

    # -- the batching thread ---------------------------------------------------------------------------------

    def _run_batches(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while True:  # take everything else already waiting: it runs in the same batches
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            by_key: dict = {}
            for job in jobs:
                by_key.setdefault(job.batch_key, []).append(job)
            for key, group in by_key.items():
                if key == SCORING:
                    self._settle(group, self._score_prompts)
                elif key.seed is not None:  # seeded requests never share a batch: that keeps them reproducible
                    for job in group:
                        self._settle([job], lambda prompts, params=key: self._generate(prompts, params))
                else:
                    self._settle(group, lambda prompts, params=key: self._generate(prompts, params))

    def _settle(self, jobs: list[Job], run) -> None:
        """Run the jobs' prompts together and hand each job its share of the answers (or the error)."""
        try:
            with self.continuous.paused() if self.continuous else contextlib.nullcontext():
                answers = run([prompt for job in jobs for prompt in job.prompts])
        except Exception as error:  # noqa: BLE001 - the error goes to the waiting requests, the loop goes on
            log.exception("batch of %d requests failed", len(jobs))
            for job in jobs:
                job.result.set_exception(error)
            return
        offset = 0
        for job in jobs:
            job.result.set_result(answers[offset : offset + len(job.prompts)])
            offset += len(job.prompts)

    @torch.inference_mode()
    def _generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        per_batch = max(1, self.max_batch_size // params.n)
        texts: list[list[str]] = []
        for start in range(0, len(prompts), per_batch):
            texts.extend(self._generate_batch(prompts[start : start + per_batch], params))
        return texts

    def _generate_batch(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        prompt_width = inputs["input_ids"].shape[1]
        stop_ids = self._stop_ids(params)
        extra = {}
        if params.presence_penalty or params.frequency_penalty:
            extra["logits_processor"] = LogitsProcessorList(
                [PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_width)]
            )
        if params.stop:
            extra.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        output = self.model.generate(
            **inputs, generation_config=self._generation_config(params, stop_ids), **extra
        )
        rows = [self._decode(row[prompt_width:], stop_ids, params) for row in output.tolist()]
        return [rows[i : i + params.n] for i in range(0, len(rows), params.n)]

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        return (() if params.ignore_eos else self.eos_token_ids) + (params.stop_token_ids or ())

    def _generation_config(self, params: SamplingParams, stop_ids: tuple[int, ...]) -> GenerationConfig:
        # Built from scratch so a checkpoint's own sampling defaults never leak into a request.
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            eos_token_id=list(stop_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.model.generation_config.bos_token_id,
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
            do_sample=not params.is_greedy,
        )
        if not params.is_greedy:
            config.temperature = params.temperature
            config.top_p = params.top_p
            config.top_k = params.top_k if params.top_k > 0 else 0
            config.min_p = params.min_p or None
        else:
            config.temperature, config.top_p, config.top_k = None, None, None
        return config

    def _decode(self, tokens: list[int], stop_ids: tuple[int, ...], params: SamplingParams) -> str:
        # A finished row is padded after its stop token; the answer ends before that token, as in vLLM.
        end = next((i for i, token in enumerate(tokens) if token in stop_ids), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=params.skip_special_tokens)
        return truncate_at_stop(text, params.stop)

    @torch.inference_mode()
    def _score_prompts(self, prompts: list[str]) -> list[list[float]]:
        encoded = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        scores: list[list[float]] = []
        for chunk in _chunks_within(encoded, SCORING_TOKEN_BUDGET):
            scores.extend(self._score_batch(chunk))
        return scores

    def _score_batch(self, encoded: list[list[int]]) -> list[list[float]]:
        # Right padding: a causal model's logits for the real tokens do not depend on padding after them.
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded], device=self.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return [logprobs[row, : len(ids) - 1].tolist() for row, ids in enumerate(encoded)]


def _chunks_within(encoded: list[list[int]], token_budget: int):
    """Consecutive groups whose padded size (rows x longest) stays within the budget (a longer prompt: alone)."""
    chunk: list[list[int]] = []
    for ids in encoded:
        if chunk and (len(chunk) + 1) * max(len(ids), *map(len, chunk)) > token_budget:
            yield chunk
            chunk = []
        chunk.append(ids)
    if chunk:
        yield chunk


def _torch_dtype(name: str):
    return name if name == "auto" else getattr(torch, name)


def _device_map(per_proc_gpus: int):
    if not torch.cuda.is_available():
        return None
    # Over several GPUs of the slice, accelerate places the layers; on one, everything goes to the slice's GPU.
    return "auto" if per_proc_gpus > 1 else {"": 0}


def build_engine() -> TransformersEngine:
    settings = load_settings()
    model_path = settings.model_path or str(resolve_model(settings.model_name))
    log.info("worker %s: loading %s from %s", os.getpid(), settings.model_name or EMBEDDED_MODEL_NAME, model_path)
    return TransformersEngine(model_path, settings.model_name or EMBEDDED_MODEL_NAME, settings)


app = create_app(build_engine, load_wait_s=load_settings().worker_timeout)
