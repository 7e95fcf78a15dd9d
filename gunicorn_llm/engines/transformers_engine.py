"""The Hugging Face transformers engine, and the WSGI app gunicorn serves with `--infer_type transformers`.

It loads the model and picks how concurrent generations of a worker are served together: every worker runs batched
`generate` (transformers_generate.py), and on one device may run a continuous path beside it (transformers_batching.py
is their interface):

- slot batching (transformers_slots.py), the default on one GPU, for every generation request;
- continuous batching (transformers' own manager, transformers_continuous.py), for models slot batching does not
  support, for requests whose sampling it supports (structured outputs and token controls too, unless it runs with
  CUDA graphs);
- batched `generate` for the rest: everything on CPU or over several GPUs, what continuous batching cannot do.

A request goes to the continuous path if it can serve it, else to batched `generate`. A greedy request's `seed` is
dropped on arrival: it draws nothing, and must not split it from its batch. Prompt log-probabilities go to the
batched-generate thread on every path, where every request waiting is scored in shared forward passes
(transformers_scoring.py); a greedy one-token generation of a prompt scored a moment ago is answered from that
scoring. Token controls (logit_bias, allowed_token_ids, bad_words, min_tokens: token_controls.py) are applied on
every path. Which path served each prompt is counted in /metrics. Structured outputs are compiled with xgrammar for
this model's tokenizer (grammars.py) when a request arrives, and masked on every path; transformers' continuous
batching with CUDA graphs leaves constrained and controlled requests to batched `generate`.

The HTTP side lives in http/app.py; text (decoding, stop strings) in generation.py; this file only drives the model.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from gunicorn_llm.engines.base import Engine, GenerationStream, wait_for
from gunicorn_llm.engines.grammars import Grammars
from gunicorn_llm.engines.token_controls import TokenControls
from gunicorn_llm.engines.transformers_batching import BatchingPath, ContinuousPath
from gunicorn_llm.engines.transformers_continuous import ContinuousBatching
from gunicorn_llm.engines.transformers_generate import BatchedGenerate
from gunicorn_llm.engines.transformers_scoring import NextTokens, full_pass_bytes, share_device_memory
from gunicorn_llm.engines.transformers_slots import SlotBatching, supports
from gunicorn_llm.ops import metrics
from gunicorn_llm.request_schema import SamplingParams, StructuredOutputs
from gunicorn_llm.settings import ServerSettings

log = logging.getLogger("gunicorn.error")

# --max-batch-size's defaults: rows per batched generate (CPU memory and latency), and slot batching's sequences per
# worker (on GPU; within --threads 256 with --max-waiting 64 more)
GENERATE_BATCH_SIZE = 32
SLOTS_PER_WORKER = 128
# Share of the free device memory (after the weights) that continuous batching may take for its KV cache; the rest
# is headroom for the batched-generate path and vocabulary-sized temporaries.
KV_CACHE_MEMORY_SHARE = 0.7
# The slots' KV cache: on GPU it leaves at least this much of the worker's share for activations, CUDA graphs and
# logits (and more for scoring passes: _slot_cache_bytes); on CPU it is this size (sized from the host's free memory it
# would take most of it).
ACTIVATION_HEADROOM_BYTES = 1 << 30
SLOT_CACHE_BYTES_ON_CPU = 1 << 30


class TransformersEngine(Engine):
    def __init__(self, model_path: str, model_name: str, settings: ServerSettings):
        self.model_name = model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=settings.trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            # PyTorch's SDPA prefers cuDNN's attention on recent GPUs, and cuDNN builds an execution plan for every
            # new shape: about 10 ms of CPU per layer call in scoring passes (H100, docs/benchmarks.md), whose rows
            # and widths change with every batch, as prefills' do. The other kernels (flash, memory-efficient) have
            # no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
            share_device_memory(settings.workers_per_gpu, settings.gpu_memory_utilization)
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
        self.grammars = Grammars(self.tokenizer, self.model.get_output_embeddings().weight.shape[0],
                                 self.eos_token_ids)
        continuous = self._continuous_path(settings)
        self.scored_next_tokens = NextTokens()  # what comes after recently scored prompts
        self.stream_interval = settings.stream_interval
        self.generate = BatchedGenerate(self.model, self.tokenizer, settings.max_batch_size or GENERATE_BATCH_SIZE,
                                        beside=continuous, on_death=self.die, on_step=self.step_taken,
                                        stream_interval=settings.stream_interval, grammars=self.grammars)
        # In order of preference: a request goes to the first that can serve it, and the first names the worker's
        # batching (batched generate serves everything).
        self.paths: list[BatchingPath] = [path for path in (continuous, self.generate) if path is not None]

    def _continuous_path(self, settings: ServerSettings) -> ContinuousPath | None:
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
                                on_death=self.die, on_step=self.step_taken, stream_interval=settings.stream_interval,
                                grammars=self.grammars)
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # Instances sharing a GPU (--workers-per-gpu) split the memory the cache may take.
        memory_share = KV_CACHE_MEMORY_SHARE / settings.workers_per_gpu
        return ContinuousBatching(self.model, self.tokenizer.pad_token_id, vocab_size, memory_share, self.die,
                                  cuda_graphs=settings.cuda_graphs and self.device.type == "cuda",
                                  stream_interval=settings.stream_interval, grammars=self.grammars)

    def _slot_cache_bytes(self, settings: ServerSettings) -> int:
        """What the slots' KV cache may take: this worker's share of the GPU (--gpu-memory-utilization over
        --workers-per-gpu) less what it holds already (the weights) and room for activations and for scoring passes
        (which stay within the share too); no more than is free."""
        if self.device.type != "cuda":
            return SLOT_CACHE_BYTES_ON_CPU
        free, total = torch.cuda.mem_get_info(self.device)
        share = settings.gpu_memory_utilization * total / settings.workers_per_gpu - torch.cuda.memory_allocated(
            self.device)
        # A scoring pass's whole token budget where the share allows, half of what is left where it does not.
        headroom = max(ACTIVATION_HEADROOM_BYTES, min(full_pass_bytes(self.model), share // 2))
        return int(min(share, free) - headroom)

    def close(self) -> None:
        """Stop the paths' threads (the continuous-batching manager's loop is not a daemon)."""
        for path in self.paths:
            path.close()

    def running(self) -> int:
        return sum(path.running() for path in self.paths)

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
            "batching": self.paths[0].name,
            **self.paths[0].describe(),
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
        path = next(path for path in self.paths if path.can_serve(params))
        metrics.engine_path_taken(path.name)
        # min_tokens holds back the end-of-sequence tokens also when the request ignores them, as vLLM does
        controls = TokenControls.of(params, self.tokenizer, stop_ids | frozenset(self.eos_token_ids), self.device)
        return path.start(prompt_ids, params, stop_ids, controls)

    def check_structured_outputs(self, constraint: StructuredOutputs) -> None:
        self.grammars.compile(constraint)

    def prompt_logprobs(self, prompts: list[list[int]], top: int = 0, deadline: float | None = None):
        metrics.engine_path_taken("prompt_logprobs", len(prompts))
        return wait_for(self.generate.score(prompts, top, self.scored_next_tokens), deadline)
