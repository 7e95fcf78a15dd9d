"""The vLLM engine, and the WSGI app gunicorn serves with `--infer_type vllm`.

One vLLM engine per worker, built after the worker's slice is pinned, with `tensor_parallel_size` = the slice's
GPUs. A background thread owns the engine: it admits and aborts the requests that handler threads queue, steps
the engine, and publishes each request's new tokens to its stream. All of a worker's concurrent requests therefore
share vLLM's continuous batching; nothing holds a lock around a blocking generate, and requests are never served
one at a time. Text and stop strings are handled above the engine (generation.py), as for the transformers engine.

Where vLLM's engine core (scheduler and model runner) runs, `--vllm-engine-core`:
- `process` (the default on GPUs): in a process of its own, as in vLLM's own server. The GPU then never waits for
  the worker's Python: the core schedules and runs steps back to back while the worker's threads parse requests
  and write answers, and the worker only exchanges messages with it.
- `worker` (the default on CPU): inside the worker process. On CPU a step takes tens of milliseconds and the cores
  are few, so a second busy process costs more than it frees (docs/benchmarks.md).
Either way, no engine process outlives its worker: every process the worker starts is in the worker's process
group (ops/engine_processes.py), and the gunicorn master ends whatever is left of a worker that exited, before its
slice is given to a replacement.

Token controls (logit_bias, allowed_token_ids, bad_words, min_tokens) go to vLLM's sampler as they are. Structured
outputs go to vLLM's own structured decoding (`StructuredOutputsParams`, its default backend); a request's
constraint is first checked by vLLM's own validation in the request thread (cached by the constraint), so one that
cannot compile is the client's 400, not a failed generation.

The HTTP side lives in http/app.py; this file only builds and drives the engine.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from gunicorn_llm.engines.base import ChoiceUpdate, DeadlineExceeded, Engine, GenerationStream, TokenLogprob, wait_for
from gunicorn_llm.engines.cpu_memory import cpu_kv_cache_bytes
from gunicorn_llm.request_schema import RequestError, SamplingParams, StructuredOutputs
from gunicorn_llm.settings import ServerSettings

log = logging.getLogger("gunicorn.error")
CACHED_CONSTRAINT_CHECKS = 256
SHUTDOWN_TIMEOUT_S = 10.0  # for vLLM's engine core to stop when asked, before the worker's group is signalled
# A vLLM executor class by qualified name, in place of vLLM's own: scripts/bench_request_path.py puts a paced stand-in
# for the model there (benchkit/paced_executor.py) to measure the front ends without a GPU.
EXECUTOR_ENV = "GUNICORN_LLM_VLLM_EXECUTOR"


@dataclass
class Submission:
    """One vLLM request: a tokenized prompt with its sampling parameters, and where its outputs go."""

    prompt_ids: list[int]
    sampling: object  # vllm.SamplingParams, imported with vLLM in the worker
    stream: GenerationStream | None = None  # generation: updates as they come
    result: Future | None = None  # prompt scoring: the final output
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def engine_input(self):
        """The prompt as vLLM's engine input for token ids: a raw `{"prompt_token_ids": ...}` prompt goes through
        vLLM's deprecated path, which renders it again (about 11 us more a request on CPU) and logs a warning."""
        from vllm.inputs import tokens_input

        return tokens_input(self.prompt_ids)


class VLLMEngine(Engine):
    def __init__(self, model_path: str, model_name: str, settings: ServerSettings):
        import torch

        on_gpu = torch.cuda.is_available()
        self.engine_core = settings.vllm_engine_core_placement(on_gpu)
        own_process = self.engine_core == "process"
        # vLLM reads this when it builds the engine: "0" keeps the engine core in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if own_process else "0"
        if own_process:
            # The worker has threads (a forked child would inherit their locks) and may have touched CUDA.
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLMEngine
        from vllm.usage.usage_lib import UsageContext

        self.model_name = model_name
        self.engine = LLMEngine.from_engine_args(
            engine_args(model_path, model_name, settings, on_gpu),
            # vLLM's server's defaults (sequences and tokens per step for this device), not the offline ones.
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_multiprocessing=own_process,
        )
        self._set_up(model_path, settings)
        threading.Thread(target=self._drive, name="vllm-engine", daemon=True).start()

    def _set_up(self, model_path: str, settings: ServerSettings) -> None:
        """What the worker keeps beside vLLM's engine client: tokenizer, end tokens, the requests it runs."""
        from transformers import AutoTokenizer

        # The text path's own tokenizer. vLLM's (`engine.get_tokenizer()`) routes each call through a pool that
        # deep-copies the whole tokenizer whenever more threads use it at once than it holds copies (2): under a
        # worker's hundreds of request threads, each copy held the GIL for about 0.1 s (docs/benchmarks.md).
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=settings.trust_remote_code)
        eos = self.engine.model_config.hf_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(i for i in eos_ids if i is not None))
        self.max_model_len = self.engine.model_config.max_model_len
        self._incoming: queue.Queue = queue.Queue()
        self._running: dict[str, Submission] = {}
        self._constraint_problem = functools.lru_cache(maxsize=CACHED_CONSTRAINT_CHECKS)(self._find_constraint_problem)

    def running(self) -> int:
        return sum(submission.sampling.n for submission in list(self._running.values()))

    def close(self) -> None:
        # vLLM's own shutdown: its engine core stops and is waited for, and vLLM does not report it as an engine
        # that "exited unexpectedly", as it did when the worker's exit hook signalled its process group first. An
        # engine core inside the worker is left to the process's exit: it may be in the middle of a step.
        if self.engine_core == "process":
            self.engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

    def describe(self) -> dict:
        config = self.engine.model_config
        return {"model": self.model_name, "engine": "vllm", "engine_core": self.engine_core,
                "dtype": str(config.dtype).removeprefix("torch."), "max_model_len": config.max_model_len,
                "running": self.running()}

    # -- the interface the layers above call (from many threads) ---------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        try:
            sampling = self._sampling_params(params)
        except ValueError as error:  # vLLM's own checks (greedy `n` > 1, for one): its server answers them with 400
            raise RequestError(f"vLLM refuses these sampling parameters: {error}") from None
        submission = Submission(prompt_ids, sampling)
        submission.stream = GenerationStream(params.n, abort=lambda: self._command("abort", submission))
        self._command("add", submission)
        return submission.stream

    def check_structured_outputs(self, constraint: StructuredOutputs) -> None:
        problem = self._constraint_problem(constraint)
        if problem is not None:
            raise ValueError(problem)

    def _find_constraint_problem(self, constraint: StructuredOutputs) -> str | None:
        """What vLLM's request validation says of the constraint (it compiles it with the backend it would pick),
        or None; the engine's own request processing runs the same validation again, on a fresh copy."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.exceptions import VLLMClientError

        processor = self.engine.input_processor
        try:
            VLLMSamplingParams(structured_outputs=_structured_outputs(constraint)).verify(
                processor.model_config, processor.speculative_config, processor.structured_outputs_config,
                processor.tokenizer)
        except (ValueError, VLLMClientError) as error:  # what vLLM's own server answers with a 400
            return f"cannot be compiled: {error}"
        return None

    def prompt_logprobs(self, prompts: list[list[int]], top: int = 0, deadline: float | None = None):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # prompt_logprobs=top: each prompt token's log-probability and the `top` likeliest alternatives; one token
        # is generated because vLLM always samples at least one.
        sampling = VLLMSamplingParams(
            max_tokens=1, prompt_logprobs=top, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        submissions = [Submission(ids, sampling, result=Future()) for ids in prompts]
        for submission in submissions:
            self._command("add", submission)
        try:
            outputs = [wait_for(submission.result, deadline) for submission in submissions]
        except DeadlineExceeded:
            for submission in submissions:
                self._command("abort", submission)
            raise
        return [
            [_token_logprob(token, entry, top)
             for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)]
            for out in outputs
        ]

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
            stop_token_ids=list(params.stop_token_ids) if params.stop_token_ids else None,
            ignore_eos=params.ignore_eos,
            max_tokens=params.max_tokens,
            logprobs=params.logprobs,
            structured_outputs=_structured_outputs(params.structured_outputs) if params.structured_outputs else None,
            logit_bias=dict(params.logit_bias) if params.logit_bias else None,
            allowed_token_ids=list(params.allowed_token_ids) if params.allowed_token_ids else None,
            bad_words=list(params.bad_words) if params.bad_words else None,  # tokenized by vLLM, by its own rule
            min_tokens=params.min_tokens,
            # Text and stop strings are found above the engine, for both engines alike (generation.py).
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def _command(self, command: str, submission: Submission) -> None:
        """Hand "add" or "abort" of a submission to the thread that drives the engine."""
        self._incoming.put((command, submission))

    # -- the engine thread -----------------------------------------------------------------------------------

    def _drive(self) -> None:
        while True:
            # Block while idle; once requests run, only take what is already waiting between steps.
            self._take_commands(block=not self.engine.has_unfinished_requests())
            try:
                self.step_taken()
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - vLLM cannot go on after a failed step: fail, then replace
                if self.stopping:
                    return  # the worker is exiting and shut the engine down: nothing failed
                log.exception("vLLM engine step failed")
                self._fail_running(error)
                self.die(error)
                continue
            for output in outputs:
                self._deliver(output)

    def _deliver(self, output) -> None:
        submission = self._running.get(output.request_id)
        if submission is None:
            return
        self._publish(submission, output)

    def _publish(self, submission: Submission, output) -> None:
        """One vLLM RequestOutput of a running submission to its stream (or, finished, to its result)."""
        if output.finished:
            self._running.pop(submission.request_id, None)
        if submission.result is not None:
            if output.finished:
                submission.result.set_result(output)
            return
        for completion in output.outputs:
            reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else None
            logprobs = None
            if completion.logprobs is not None:
                logprobs = [
                    _token_logprob(token, entry, submission.sampling.logprobs)
                    for token, entry in zip(completion.token_ids, completion.logprobs, strict=True)
                ]
            if completion.token_ids or reason:
                submission.stream.publish(ChoiceUpdate(completion.index, list(completion.token_ids), logprobs, reason))

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                command, submission = self._incoming.get(block=block)
            except queue.Empty:
                return
            block = False
            if command == "abort":
                if self._running.pop(submission.request_id, None) is not None:
                    self.engine.abort_request([submission.request_id])
                continue
            try:
                self.engine.add_request(submission.request_id, submission.engine_input(), submission.sampling)
            except Exception as error:  # noqa: BLE001 - e.g. a prompt longer than the context: that request fails
                _fail(submission, error)
                continue
            self._running[submission.request_id] = submission

    def _fail_running(self, error: Exception) -> None:
        running, self._running = self._running, {}
        self.engine.abort_request(list(running))
        for submission in running.values():
            _fail(submission, error)


def engine_args(model_path: str, model_name: str, settings: ServerSettings, on_gpu: bool, shared: bool = False,
                frontend: bool = False):
    """vLLM's EngineArgs for this server's settings: a worker's own engine, or (`shared`) a slice's shared core and
    the front ends that attach to it, which build the same configuration but hold no cache (`frontend`: its size is
    not measured, from memory the core already took)."""
    from vllm import EngineArgs

    return EngineArgs(
        model=model_path,
        served_model_name=model_name,
        tensor_parallel_size=settings.per_proc_gpus if on_gpu else 1,
        max_model_len=settings.max_model_len,
        dtype=settings.weights_dtype(on_gpu),
        quantization=settings.quantization,
        # Instances sharing a slice (--workers-per-gpu, each its own engine) split the GPU memory between them.
        gpu_memory_utilization=settings.gpu_memory_utilization / (1 if shared else settings.workers_per_gpu),
        enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else not on_gpu,
        trust_remote_code=settings.trust_remote_code,
        seed=0,
        # vLLM builds a request's output once per interval, not per token: its streams hold nothing back.
        stream_interval=settings.stream_interval,
        distributed_executor_backend=os.environ.get(EXECUTOR_ENV) or None,
        # On CPU, a KV cache sized from the memory free now (cpu_memory.py); on GPUs vLLM sizes it.
        **({} if on_gpu or frontend else {"kv_cache_memory_bytes": cpu_kv_cache_bytes(model_path, settings)}),
    )


def _fail(submission: Submission, error: BaseException) -> None:
    if submission.result is not None:
        submission.result.set_exception(error)
    else:
        submission.stream.fail(error)


def _structured_outputs(constraint: StructuredOutputs):
    """The constraint as vLLM's StructuredOutputsParams (a fresh one: vLLM's validation rewrites it)."""
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=constraint.json_schema, json_object=constraint.json_object,
                                   regex=constraint.regex, grammar=constraint.grammar,
                                   choice=list(constraint.choice) if constraint.choice else None)


def _token_logprob(token: int, entry: dict, top: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} for one position (the chosen token plus the likeliest ones) as a TokenLogprob."""
    ranked = sorted(((t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top),
                    key=lambda pair: -pair[1])
    return TokenLogprob(token, entry[token].logprob, tuple(ranked[:top]), entry[token].rank)

