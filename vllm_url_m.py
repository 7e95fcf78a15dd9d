"""The vLLM engine, and the WSGI app gunicorn serves with `--infer_type vllm`.

One vLLM engine per worker, built after the worker's slice is pinned, with `tensor_parallel_size` = the slice's
GPUs. A background thread owns the engine: it admits requests that handler threads queue, steps the engine, and
settles each request's future when it finishes. All of a worker's concurrent requests therefore share vLLM's
continuous batching; nothing holds a lock around a blocking generate, and requests are never served one at a time.

The engine core runs inside the worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0) rather than in a process of its
own: when gunicorn kills or recycles a worker, its engine goes with it, and no engine process is left behind. With
a multi-GPU slice vLLM starts one process per extra GPU; those watch their parent and exit with it.

The HTTP side lives in serving.py; this file only builds and drives the engine.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine import Engine
from model_store import EMBEDDED_MODEL_NAME, resolve_model
from request_schema import SamplingParams
from server_settings import ServerSettings, load_settings
from serving import create_app

log = logging.getLogger("gunicorn.error")


@dataclass
class Submission:
    """One vLLM request: a prompt with its sampling parameters, and the future its handler thread waits on."""

    prompt: str
    sampling: object  # vllm.SamplingParams, imported with vLLM in the worker
    result: Future = field(default_factory=Future)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class VLLMEngine(Engine):
    def __init__(self, model_path: str, model_name: str, settings: ServerSettings):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import EngineArgs, LLMEngine

        self.model_name = model_name
        on_gpu = torch.cuda.is_available()
        self.engine = LLMEngine.from_engine_args(
            EngineArgs(
                model=model_path,
                served_model_name=model_name,
                tensor_parallel_size=settings.per_proc_gpus if on_gpu else 1,
                max_model_len=settings.max_model_len,
                dtype=settings.weights_dtype(on_gpu),
                quantization=settings.quantization,
                # Instances sharing a slice (--workers-per-gpu) split the GPU memory between them.
                gpu_memory_utilization=settings.gpu_memory_utilization / settings.workers_per_gpu,
                enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else not on_gpu,
                trust_remote_code=settings.trust_remote_code,
                seed=0,
            )
        )
        self.tokenizer = self.engine.get_tokenizer()
        self._incoming: queue.Queue[Submission] = queue.Queue()
        self._running: dict[str, Submission] = {}
        threading.Thread(target=self._drive, name="vllm-engine", daemon=True).start()

    def describe(self) -> dict:
        config = self.engine.model_config
        return {"model": self.model_name, "engine": "vllm", "dtype": str(config.dtype).removeprefix("torch."),
                "max_model_len": config.max_model_len}

    # -- the interface the HTTP layer calls (from many threads) ----------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        sampling = self._sampling_params(params)
        outputs = self._run([Submission(prompt, sampling) for prompt in prompts])
        return [[choice.text for choice in sorted(output.outputs, key=lambda c: c.index)] for output in outputs]

    def prompt_logprobs(self, prompts: list[str]) -> list[list[float]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # prompt_logprobs=0: the log-probability of each actual prompt token, nothing more; one token is generated
        # because vLLM always samples at least one.
        sampling = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY)
        outputs = self._run([Submission(prompt, sampling) for prompt in prompts])
        return [
            [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
            for out in outputs
        ]

    def _run(self, submissions: list[Submission]) -> list:
        for submission in submissions:
            self._incoming.put(submission)
        return [submission.result.result() for submission in submissions]

    def _sampling_params(self, params: SamplingParams):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VLLMSamplingParams(
            n=params.n,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            min_p=params.min_p,
            seed=params.seed,
            stop=list(params.stop) if params.stop else None,
            stop_token_ids=list(params.stop_token_ids) if params.stop_token_ids else None,
            ignore_eos=params.ignore_eos,
            max_tokens=params.max_tokens,
            skip_special_tokens=params.skip_special_tokens,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    # -- the engine thread -----------------------------------------------------------------------------------

    def _drive(self) -> None:
        while True:
            # Block while idle; once requests run, only take what is already waiting between steps.
            self._admit(block=not self.engine.has_unfinished_requests())
            try:
                finished = [output for output in self.engine.step() if output.finished]
            except Exception as error:  # noqa: BLE001 - every waiting request learns why, the worker keeps serving
                log.exception("vLLM engine step failed")
                self._fail_running(error)
                continue
            for output in finished:
                submission = self._running.pop(output.request_id, None)
                if submission is not None:
                    submission.result.set_result(output)

    def _admit(self, block: bool) -> None:
        while True:
            try:
                submission = self._incoming.get(block=block)
            except queue.Empty:
                return
            block = False
            try:
                self.engine.add_request(submission.request_id, submission.prompt, submission.sampling)
            except Exception as error:  # noqa: BLE001 - e.g. a prompt longer than the context: that request fails
                submission.result.set_exception(error)
                continue
            self._running[submission.request_id] = submission

    def _fail_running(self, error: Exception) -> None:
        running, self._running = self._running, {}
        self.engine.abort_request(list(running))
        for submission in running.values():
            submission.result.set_exception(error)


def build_engine() -> VLLMEngine:
    settings = load_settings()
    model_path = settings.model_path or str(resolve_model(settings.model_name))
    log.info("worker %s: loading %s from %s", os.getpid(), settings.model_name or EMBEDDED_MODEL_NAME, model_path)
    return VLLMEngine(model_path, settings.model_name or EMBEDDED_MODEL_NAME, settings)


app = create_app(build_engine, load_wait_s=load_settings().worker_timeout)
