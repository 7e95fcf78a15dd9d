"""Every server setting, declared once: its environment variable, launcher flag, default, check and help.

The launcher (`start_gunicorn.sh`) turns its options into these environment variables; `gunicorn_conf.py` and the
workers read them back through `load_settings()`. Nothing else reads the environment for configuration.

The launcher's pre-flight (gunicorn_llm/preflight.py) validates them first: a bad value is one line on stderr and
exit status 2, before gunicorn starts. This module is the package's lowest layer: it imports nothing of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

USAGE_ERROR = 2


def _setting(default, env: str, flag: str | None, help: str, **checks):
    return Field(default, validation_alias=env, description=help, json_schema_extra={"flag": flag}, **checks)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=False)

    model_name: str | None = _setting(
        None, "HF_MODEL_NAME", "--model_name", "local folder or Hugging Face name; empty: the embedded SmolLM2-135M"
    )
    model_path: str | None = _setting(None, "MODEL_PATH", None, "resolved model folder (set by the launcher)")
    infer_type: Literal["vllm", "transformers"] = _setting(
        "transformers", "INFER_TYPE", "--infer_type", "engine: vllm or transformers (any case)"
    )
    per_proc_gpus: int = _setting(1, "PER_PROC_GPUS", "--per_proc_gpus", "GPUs per model instance", ge=1)
    workers_per_gpu: int = _setting(
        1, "WORKERS_PER_GPU", "--workers-per-gpu", "model instances sharing one GPU slice", ge=1, le=64
    )
    cpu_workers: int = _setting(1, "CPU_WORKERS", "--cpu-workers", "workers when there is no GPU", ge=1, le=256)
    host: str = _setting("127.0.0.1", "HOST", "--host", "address to listen on", min_length=1)
    port: int = _setting(5002, "PORT", "--port", "port to listen on", ge=1, le=65535)
    cuda_visible_devices: str | None = _setting(
        None, "CUDA_VISIBLE_DEVICES", "--cuda-visible-devices", "GPUs to serve on, by index or UUID"
    )
    gpu_ids: str | None = _setting(
        None, "GPU_IDS", "--gpu-ids", "GPU list to slice instead of asking NVML (testing on machines without GPUs)"
    )
    max_model_len: int | None = _setting(
        None, "MAX_MODEL_LEN", "--max-model-len", "context length (prompt + output tokens)", ge=1
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _setting(
        "auto", "DTYPE", "--dtype", "weights dtype; auto: the checkpoint's"
    )
    quantization: str | None = _setting(None, "QUANTIZATION", "--quantization", "vLLM quantization method")
    worker_timeout: int = _setting(
        300, "WORKER_TIMEOUT", "--timeout", "seconds before a silent worker is killed; also the graceful drain", ge=1
    )
    api_key: str | None = _setting(None, "API_KEY", "--api-key", "Bearer key the generation routes require")
    api_key_file: str | None = _setting(
        None, "API_KEY_FILE", "--api-key-file", "file of accepted Bearer keys, one per line (# comments)"
    )
    protect_monitoring: bool = _setting(
        False, "PROTECT_MONITORING", "--protect-monitoring",
        "with keys set, /health, /ready, /metrics, /workers and / need a key too",
    )
    max_waiting: int = _setting(
        64, "MAX_WAITING", "--max-waiting", "requests a worker holds before their first token; more get 503", ge=1
    )
    request_timeout: float = _setting(
        600.0, "REQUEST_TIMEOUT", "--request-timeout", "seconds a request may take; then generation stops, 504", gt=0
    )
    max_body_bytes: int = _setting(
        8 * 1024 * 1024, "MAX_BODY_BYTES", "--max-body-bytes", "largest request body; larger is 413", ge=1024
    )
    max_instances: int = _setting(
        256, "MAX_INSTANCES", "--max-instances", "prompts in one request at most (/infer, /v1/completions)", ge=1
    )
    max_requests: int = _setting(
        0, "MAX_REQUESTS", "--max-requests", "requests before a worker is recycled (0: never)", ge=0
    )
    gpu_memory_utilization: float = _setting(
        0.9, "GPU_MEMORY_UTILIZATION", "--gpu-memory-utilization",
        "share of each GPU's memory vLLM or the transformers engine's slots may use, split between "
        "--workers-per-gpu instances", gt=0.0, le=1.0,
    )
    enforce_eager: bool | None = _setting(
        None, "ENFORCE_EAGER", "--enforce-eager",
        "no CUDA graphs: vLLM (nor compilation), and the transformers engine's slots (default: on CPU only)"
    )
    cuda_graphs: bool = _setting(
        False, "CUDA_GRAPHS", "--cuda-graphs",
        "transformers engine on GPU: continuous batching replays CUDA graphs (captured at load and as new batch "
        "shapes appear) instead of launching every kernel",
    )
    threads: int = _setting(
        256, "THREADS", "--threads", "concurrent connections per worker; keep it above running + --max-waiting",
        ge=1, le=4096,
    )
    max_batch_size: int | None = _setting(
        None, "MAX_BATCH_SIZE", "--max-batch-size",
        "transformers engine: sequences per batched generate (default 32), and slots per worker (default 128, fewer "
        "when their cache does not fit)", ge=1
    )
    batching: Literal["auto", "generate", "continuous", "slots"] = _setting(
        "auto", "BATCHING", "--batching",
        "transformers engine: slots (this server's continuous batching over a static cache, CUDA graphs on GPU), "
        "continuous (transformers' continuous batching), generate (batched generate), "
        "auto: slots on GPU (continuous for models with sliding windows or soft-capping), generate on CPU",
    )
    stream_interval: int = _setting(
        1, "STREAM_INTERVAL", "--stream-interval",
        "tokens per streamed chunk after the first (as vLLM's --stream-interval): more writes fewer, larger chunks, "
        "which frees a busy worker's Python for throughput", ge=1, le=1024,
    )
    vllm_engine_core: Literal["auto", "process", "worker"] = _setting(
        "auto", "VLLM_ENGINE_CORE", "--vllm-engine-core",
        "vLLM engine: where its engine core runs: process (its own, as in vLLM's server), worker (inside the "
        "worker process), auto: process on GPUs, worker on CPU",
    )
    slice_wait: float | None = _setting(
        None, "SLICE_WAIT", None, "seconds a new worker waits for a GPU slice to free up (default: timeout + 30)", ge=0
    )
    dispatcher_state: str = _setting(
        "/tmp/gunicorn-llm-gpu-slices.json", "DISPATCHER_STATE", None, "host-wide file recording slice holders"
    )
    fault_inject_after_steps: int | None = _setting(
        None, "FAULT_INJECT_AFTER_STEPS", None, "fault tests only: the engine fails at this generation step", ge=1
    )
    trust_remote_code: bool = _setting(False, "TRUST_REMOTE_CODE", None, "run code shipped with the model")
    log_level: Literal["debug", "info", "warning", "error"] = _setting("info", "LOG_LEVEL", "--log-level", "")

    @field_validator("infer_type", "dtype", "log_level", "batching", "vllm_engine_core", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_name", "quantization", "cuda_visible_devices", "gpu_ids", "model_path", "api_key",
                     "api_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        # The original launcher passed the string "None" for unset options.
        return None if value in ("", "None", "none") else value

    @field_validator("max_model_len", "max_batch_size", "slice_wait", "enforce_eager", "fault_inject_after_steps",
                     mode="before")
    @classmethod
    def _empty_number_is_unset(cls, value):
        return None if value in ("", "None", "none") else value

    def weights_dtype(self, on_gpu: bool) -> str:
        """--dtype with `auto` resolved, for both engines: the checkpoint's dtype on GPU, float32 on CPU.

        On CPUs without native bf16 units, bf16 made a prompt's log-probabilities depend on what it was batched with
        by up to 0.11 nats (docs/benchmarks.md); scores that decide benchmark results must not.
        """
        if self.dtype != "auto":
            return self.dtype
        return "auto" if on_gpu else "float32"

    def vllm_engine_core_placement(self, on_gpu: bool) -> str:
        """--vllm-engine-core with `auto` resolved: the engine core's own process on GPUs, the worker on CPU."""
        if self.vllm_engine_core != "auto":
            return self.vllm_engine_core
        return "process" if on_gpu else "worker"

    def api_keys(self) -> tuple[str, ...]:
        """Every accepted key: --api-key and the lines of --api-key-file (none: no authentication)."""
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file:
            lines = Path(self.api_key_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return tuple(keys)

    @property
    def effective_slice_wait(self) -> float:
        # gunicorn starts a reload's new workers before the old ones have drained, so wait longer than a drain.
        return self.slice_wait if self.slice_wait is not None else self.worker_timeout + 30.0


def describe_error(error: ValidationError) -> str:
    """One line per bad setting, naming the variable and the launcher flag."""
    lines = []
    for problem in error.errors():
        env = str(problem["loc"][0]) if problem["loc"] else "?"
        field = next((name for name, f in ServerSettings.model_fields.items() if f.validation_alias == env), None)
        flag = (ServerSettings.model_fields[field].json_schema_extra or {}).get("flag") if field else None
        where = f"{flag} ({env})" if flag else env
        lines.append(f"invalid {where}={os.environ.get(env, '')!r}: {problem['msg'].lower()}")
    return "; ".join(lines)


def load_settings() -> ServerSettings:
    """The settings from the environment; a bad value ends the process with a one-line message and status 2."""
    try:
        return ServerSettings()
    except ValidationError as error:
        print(f"error: {describe_error(error)}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
