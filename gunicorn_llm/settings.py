"""Every server setting, declared once: its environment variable, launcher flags, default, check, help and docs.

The launcher (`start_gunicorn.sh`) turns its options into these environment variables; `gunicorn_conf.py` and the
workers read them back through `load_settings()`. Nothing else reads the environment for configuration. The
launcher's getopt option list, its --help and the docs' option tables are rendered from these declarations
(gunicorn_llm/launcher_options.py), as gunicorn's `Setting` classes drive its command line and docs.

The launcher's pre-flight (gunicorn_llm/preflight.py) validates them first: a bad value is one line on stderr and
exit status 2, before gunicorn starts. This module is the package's lowest layer: it imports nothing of it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

USAGE_ERROR = 2


# Where a setting's row goes in the docs' option tables (gunicorn_llm/launcher_options.py renders them):
# "server" and "limits" for options, "environment" for variables without an option, None for none.
Section = Literal["server", "limits", "environment"] | None


def _setting(default, env: str, flags: str | tuple[str, ...] | None, help: str, *, meta: str | None = None,
             doc: str | None = None, shown_default: str | None = None, section: Section = "server", **checks):
    """One setting: FLAGS (the first is its name in messages, the others are accepted spellings), HELP (its line in
    --help), DOC (its row in the docs' tables; default HELP), META (its value's name in --help), SHOWN_DEFAULT (the
    default as the docs say it, when the value alone does not), SECTION (which docs table shows it)."""
    flags = (flags,) if isinstance(flags, str) else tuple(flags or ())
    extra = {"flag": flags[0] if flags else None, "aliases": list(flags[1:]), "meta": meta, "doc": doc or help,
             "shown_default": shown_default, "section": section}
    return Field(default, validation_alias=env, description=help, json_schema_extra=extra, **checks)


# --workers-per-gpu's default for the vLLM engine on slices of one GPU (elsewhere 1; tensor-parallel slices were not
# measured with several front ends): four front ends over each slice's engine core. Measured on one H100 against
# vLLM's own server (1.7B shape, 256 clients; docs/benchmarks.md): 1.99x streamed and 1.08x whole answers, where one
# worker gave 1.03x and 0.85x; at one client it costs ~7% (one more process hop).
VLLM_FRONT_ENDS_PER_GPU = 4


class ServerSettings(BaseSettings):
    """Declaration order is the order of --help and of the docs' tables."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=False)

    model_name: str | None = _setting(
        None, "HF_MODEL_NAME", ("--model_name", "--model-name", "--hf-model-name"),
        "local folder or Hugging Face name; default: the embedded SmolLM2-135M-Instruct", meta="NAME",
        doc="a local folder or a Hugging Face model name", shown_default="embedded SmolLM2-135M-Instruct",
    )
    model_path: str | None = _setting(
        None, "MODEL_PATH", None, "resolved model folder (set by the launcher)", section=None
    )
    infer_type: Literal["vllm", "transformers"] = _setting(
        "transformers", "INFER_TYPE", ("--infer_type", "--infer-type"), "transformers or vllm (any case)",
        meta="TYPE", doc="`transformers` or `vllm`, any case (`vLLM` works)",
    )
    per_proc_gpus: int = _setting(
        1, "PER_PROC_GPUS", ("--per_proc_gpus", "--per-proc-gpus"), "GPUs per model instance; must divide the GPUs",
        doc="GPUs per model instance; must divide the number of GPUs", ge=1,
    )
    workers_per_gpu: int = _setting(
        1, "WORKERS_PER_GPU", ("--workers-per-gpu", "--workers_per_gpu"),
        "workers per slice (default 1; vLLM engine on one-GPU slices: 4); vLLM: front ends sharing one engine core, "
        "transformers: model instances",
        doc="workers per slice (GPU slice, or CPU worker's share). vLLM engine: the slice runs one engine core and "
        "these workers are its front ends, each with its own Python, all feeding its one continuous batch "
        "(`docs/architecture.md`); transformers engine: each worker loads its own model instance",
        shown_default="1; vLLM engine on one-GPU slices: 4", ge=1, le=64,
    )
    cpu_workers: int = _setting(
        1, "CPU_WORKERS", "--cpu-workers", "workers when there is no GPU",
        doc="workers when there is no GPU (no NVML, or no device)", ge=1, le=256,
    )
    cuda_visible_devices: str | None = _setting(
        None, "CUDA_VISIBLE_DEVICES", ("--cuda-visible-devices", "--cuda_visible_devices"),
        "GPUs to serve on, by index or UUID (CUDA order)", meta="L", shown_default="all",
        doc="GPUs to serve on, by index or UUID (prefix), in CUDA's order",
    )
    gpu_ids: str | None = _setting(
        None, "GPU_IDS", "--gpu-ids", "slice this GPU list instead of asking NVML", meta="L", shown_default="NVML",
        doc="a GPU list to slice instead of asking NVML (tests the slicing on machines without GPUs)",
    )
    host: str = _setting("127.0.0.1", "HOST", "--host", "address to listen on", meta="ADDR", min_length=1)
    port: int = _setting(5002, "PORT", "--port", "port to listen on", ge=1, le=65535)
    max_model_len: int | None = _setting(
        None, "MAX_MODEL_LEN", ("--max-model-len", "--max_model_len"), "context length, prompt plus output tokens",
        shown_default="the model's",
        doc="context length, prompt plus output tokens (vLLM; the transformers engine's slots: each slot's cache "
        "holds this many tokens, so a lower value fits more slots)", ge=1,
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _setting(
        "auto", "DTYPE", "--dtype", "auto, bfloat16, float16 or float32; auto: the checkpoint's on GPU, else float32",
        meta="T", doc="`auto`, `bfloat16`, `float16`, `float32`; `auto` is the checkpoint's dtype on GPU and float32 "
        "on CPU (`docs/benchmarks.md` says why)",
    )
    quantization: str | None = _setting(
        None, "QUANTIZATION", "--quantization", "vLLM quantization method", meta="M",
        doc="vLLM quantization method; the transformers engine reads a checkpoint's quantization from its config and "
        "refuses this option",
    )
    gpu_memory_utilization: float = _setting(
        0.9, "GPU_MEMORY_UTILIZATION", "--gpu-memory-utilization",
        "share of each GPU's memory for vLLM or the transformers engine",
        doc="share of each GPU's memory for vLLM, or for the transformers engine (weights, slots' cache, "
        "activations and scoring passes), divided between `--workers-per-gpu` transformers instances (a slice's "
        "shared vLLM engine core takes it whole)", gt=0.0, le=1.0,
    )
    enforce_eager: bool | None = _setting(
        None, "ENFORCE_EAGER", "--enforce-eager",
        "no CUDA graphs: vLLM, and the transformers engine's slots (default on CPU only)", shown_default="on CPU only",
        doc="no CUDA graphs: vLLM (nor compilation; on CPU eager starts in about 30 s instead of minutes, at the same "
        "speed), and the transformers engine's slot batching",
    )
    cuda_graphs: bool = _setting(
        False, "CUDA_GRAPHS", "--cuda-graphs",
        "with --batching continuous: transformers' continuous batching with CUDA graphs, captured at load and as "
        "shapes appear",
        doc="with `--batching continuous`: transformers' continuous batching replays CUDA graphs with asynchronous "
        "batching, captured at load and as new batch shapes appear; opt-in: on the lent H200s capturing was slow "
        "enough that a run of 64 requests took minutes (`docs/benchmarks.md`). Slot batching always uses its own "
        "graphs on GPU",
    )
    worker_timeout: int = _setting(
        300, "WORKER_TIMEOUT", "--timeout", "seconds before a silent worker is killed; also the graceful drain on stop",
        meta="S", doc="seconds before gunicorn kills a silent worker, and the graceful drain on stop", ge=1,
    )
    # 1,024 running (vLLM's most sequences per step on a large GPU) plus 1,024 waiting: a benchmark's burst is
    # queued, not refused, and no thread limit caps what the engine could run. Threads start only when needed.
    threads: int = _setting(
        2048, "THREADS", "--threads", "concurrent connections per worker; keep it above running + --max-waiting",
        doc="concurrent connections per worker (gthread pool, a thread started only when needed); keep it above the "
        "running sequences plus `--max-waiting`", ge=1, le=4096,
    )
    max_requests: int = _setting(
        0, "MAX_REQUESTS", "--max-requests", "requests before a worker is recycled; 0: never",
        doc="requests a worker serves before gunicorn replaces it (with 10% jitter); 0: never. Health checks count "
        "too: keep it well above the checks a worker gets while its model loads", ge=0,
    )
    max_batch_size: int | None = _setting(
        None, "MAX_BATCH_SIZE", "--max-batch-size",
        "transformers engine: sequences per batched generate (32), slots per worker (128)", shown_default="32 / 128",
        doc="transformers engine: sequences per batched `generate` (32), and slots per worker (128, fewer when their "
        "cache does not fit in the worker's `--gpu-memory-utilization` share)", ge=1,
    )
    batching: Literal["auto", "generate", "continuous", "slots"] = _setting(
        "auto", "BATCHING", "--batching",
        "transformers engine: slots (own continuous batching, CUDA graphs), continuous (transformers' own), "
        "generate, or auto (slots on GPU, generate on CPU)", meta="MODE",
        doc="transformers engine: `slots` (this server's continuous batching, CUDA graphs on GPU), `continuous` "
        "(transformers' continuous batching), `generate` (batched `generate`); `auto`: slots on one GPU (continuous "
        "for models with sliding windows or soft-capping), generate on CPU or over a multi-GPU slice",
    )
    vllm_engine_core: Literal["auto", "process", "worker"] = _setting(
        "auto", "VLLM_ENGINE_CORE", "--vllm-engine-core",
        "vLLM engine: process (its engine core in a process of its own), worker (inside the worker), or auto "
        "(process on GPUs, worker on CPU)", meta="WHERE",
        doc="vLLM engine: `process` (vLLM's engine core in a process of its own, as in vLLM's server), `worker` "
        "(inside the worker); `auto`: process on GPUs, worker on CPU",
    )
    stream_interval: int = _setting(
        1, "STREAM_INTERVAL", "--stream-interval",
        "tokens per streamed chunk after the first; more: fewer writes, more throughput when busy",
        doc="tokens per streamed chunk after the first (as vLLM's flag); more: fewer, larger chunks, more throughput "
        "for a busy worker (`docs/benchmarks.md`)", ge=1, le=1024,
    )
    chat_template: str | None = _setting(
        None, "CHAT_TEMPLATE", ("--chat-template", "--chat_template"),
        "a Jinja chat template file replacing the model's",
        meta="FILE", shown_default="the model's",
        doc="a Jinja chat template file used instead of the model's (e.g. `templates/smollm2_pythonic_tools.jinja`, "
        "which renders tools for the embedded model); also for `/tokenize`",
    )
    enable_auto_tool_choice: bool = _setting(
        False, "ENABLE_AUTO_TOOL_CHOICE", "--enable-auto-tool-choice",
        "tool_choice auto: tool calls parsed from the answer by --tool-call-parser",
        doc="`tool_choice: auto` (the default when `tools` are sent): the model decides, and `--tool-call-parser` "
        "finds its calls in the answer; without it such a request is a 400, as in vLLM ([api.md](docs/api.md#"
        "function-calling))",
    )
    tool_call_parser: str | None = _setting(
        None, "TOOL_CALL_PARSER", "--tool-call-parser", "vLLM's tool-call parser for --enable-auto-tool-choice",
        meta="NAME", doc="the vLLM tool-call parser that reads the model's calls (`pythonic`, `hermes`, ...); both "
        "engines, vLLM installed",
    )
    reasoning_parser: str | None = _setting(
        None, "REASONING_PARSER", "--reasoning-parser", "vLLM's reasoning parser: reasoning_content apart from content",
        meta="NAME", doc="the vLLM reasoning parser (`qwen3`, `deepseek_r1`, ...) that moves the model's reasoning "
        "out of `content` into `reasoning_content`; both engines, vLLM installed",
    )
    log_level: Literal["debug", "info", "warning", "error"] = _setting(
        "info", "LOG_LEVEL", "--log-level", "debug, info, warning or error", meta="L",
        doc="`debug`, `info`, `warning`, `error`",
    )
    api_key: str | None = _setting(
        None, "API_KEY", "--api-key", "Bearer key the generation routes require", meta="KEY", section="limits",
        doc="Bearer key every generation and tokenizer route requires (`/infer`, `/vllm-url-infer`, `/generate`, "
        "`/v1/*`, `/tokenize`, `/detokenize`, `/tokenizer_info`); 401 otherwise",
    )
    api_key_file: str | None = _setting(
        None, "API_KEY_FILE", "--api-key-file", "file of accepted keys, one per line (# comments)", meta="F",
        section="limits", doc="file of accepted keys, one per line (`#` comments); read at start",
    )
    protect_monitoring: bool = _setting(
        False, "PROTECT_MONITORING", "--protect-monitoring", "keys also for /health, /ready, /metrics, /workers, /",
        section="limits", doc="with keys set, `/health`, `/ready`, `/metrics`, `/workers` and `/` need a key too",
    )
    max_waiting: int = _setting(
        1024, "MAX_WAITING", "--max-waiting",
        "requests waiting for a first token per worker; beyond: 503 with Retry-After", section="limits",
        doc="requests a worker holds that have not had a first token; beyond it 503 at once, with `Retry-After: 1`",
        ge=1,
    )
    request_timeout: float = _setting(
        600.0, "REQUEST_TIMEOUT", "--request-timeout", "per-request deadline in seconds; then 504", meta="S",
        section="limits", doc="seconds a request may take; then its generation stops and the client gets 504 (a "
        "stream ends with an error event)", gt=0,
    )
    max_body_bytes: int = _setting(
        8 * 1024 * 1024, "MAX_BODY_BYTES", "--max-body-bytes", "largest request body; beyond: 413",
        section="limits", shown_default="8 MiB", doc="larger bodies get 413", ge=1024,
    )
    max_instances: int = _setting(
        256, "MAX_INSTANCES", "--max-instances", "prompts per request at most", section="limits",
        doc="prompts in one request (`instances`, or a `prompt` list)", ge=1,
    )
    dispatcher_state: str = _setting(
        "/tmp/gunicorn-llm-gpu-slices.json", "DISPATCHER_STATE", None, "the host-wide file of slice holders",
        section="environment",
    )
    slice_wait: float | None = _setting(
        None, "SLICE_WAIT", None, "seconds a new worker waits for a GPU slice to free up", shown_default="timeout + 30",
        section="environment", ge=0,
    )
    trust_remote_code: bool = _setting(False, "TRUST_REMOTE_CODE", None, "run code shipped with the model (`true`)",
        section="environment",
    )
    client_indices_per_frontend: int = _setting(
        8, "CLIENT_INDICES_PER_FRONTEND", None,
        "vLLM shared engine core: attachments per front end before the core is relaunched", section="environment",
        doc="vLLM, `--workers-per-gpu` K > 1: client indices the engine core gets per front end; each attaching "
        "worker (a replacement, a HUP's) claims a fresh one, and once all are claimed the core is relaunched "
        "(the model loads again; `docs/architecture.md`)", ge=1,
    )
    fault_inject_after_steps: int | None = _setting(
        None, "FAULT_INJECT_AFTER_STEPS", None,
        "fault tests only: the engine fails at this generation step", section="environment",
        ge=1,
    )

    @field_validator("infer_type", "dtype", "log_level", "batching", "vllm_engine_core", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_name", "quantization", "cuda_visible_devices", "gpu_ids", "model_path", "api_key",
                     "api_key_file", "chat_template", "tool_call_parser", "reasoning_parser", mode="before")
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

    @property
    def shares_vllm_engine_core(self) -> bool:
        """Each slice's workers are front ends of one vLLM engine core (ops/slice_engines.py)."""
        return self.infer_type == "vllm" and self.workers_per_gpu > 1

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


@dataclass(frozen=True)
class Declared:
    """What one setting's declaration says, read back for the launcher's option list, --help and the docs."""

    env: str
    flag: str | None  # the option's name in messages and docs
    aliases: tuple[str, ...]  # other accepted spellings
    switch: bool  # a yes/no setting: its option takes no value and sets the variable to `true`
    meta: str  # the value's name in --help
    default: object
    shown_default: str | None
    help: str
    doc: str
    section: Section

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *self.aliases) if self.flag else ()


def declared_settings() -> list[Declared]:
    """Every setting, in declaration order."""
    found = []
    for field in ServerSettings.model_fields.values():
        extra = field.json_schema_extra
        switch = field.annotation in (bool, bool | None)
        number_meta = "F" if field.annotation in (float, float | None) else "N"
        found.append(Declared(
            env=str(field.validation_alias), flag=extra["flag"], aliases=tuple(extra["aliases"]), switch=switch,
            meta=extra["meta"] or number_meta, default=field.default, shown_default=extra["shown_default"],
            help=field.description, doc=extra["doc"], section=extra["section"],
        ))
    return found


def describe_error(error: ValidationError) -> str:
    """One line per bad setting, naming the variable and the launcher flag."""
    flags = {setting.env: setting.flag for setting in declared_settings()}
    lines = []
    for problem in error.errors():
        env = str(problem["loc"][0]) if problem["loc"] else "?"
        flag = flags.get(env)
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
