"""Prometheus metrics and access logs: one view over all gunicorn workers, one structured line per request.

prometheus_client's multiprocess mode keeps each worker's values in files under PROMETHEUS_MULTIPROC_DIR, which
gunicorn_conf.py creates for the server before the workers fork (and empties of a dead worker's live gauges in
`child_exit`); `/metrics` in any worker reads them all. Gauges that describe one worker carry its pid as the
`worker` label and disappear when it exits (multiprocess mode "livesum": one process per label set).

`RequestStats` follows one HTTP request: engines/generation.py reports its tokens to it (time to first token, gaps
between tokens, counts); when the response has been sent whole (streams included) it counts the request and writes
the access line: request id, route, status, tokens, time to first token, total time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

access_log = logging.getLogger("gunicorn_llm.access")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

REQUESTS = Counter("llm_requests_total", "HTTP requests answered, by route and status", ["route", "status"])
PROMPT_TOKENS = Counter("llm_prompt_tokens_total", "Prompt tokens of generation requests")
GENERATION_TOKENS = Counter("llm_generation_tokens_total", "Tokens generated")
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds", "From a generation's start to its first token", buckets=_LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "llm_inter_token_latency_seconds", "Between consecutive tokens of one sequence", buckets=_TOKEN_GAP_BUCKETS
)
REQUEST_DURATION = Histogram(
    "llm_request_duration_seconds", "From request to the last byte of the answer", ["route"], buckets=_LATENCY_BUCKETS
)
WORKER_GENERATIONS = Counter(
    "llm_worker_generation_requests_total", "Generation requests each worker answered (how the load was spread)",
    ["worker"],
)
ENGINE_PATHS = Counter(
    "llm_engine_path_total", "Prompts an engine generated for or scored, by the path that served them", ["path"]
)
RUNNING = Gauge("llm_requests_running", "Requests producing tokens", ["worker"], multiprocess_mode="livesum")
WAITING = Gauge("llm_requests_waiting", "Requests not yet given a token", ["worker"], multiprocess_mode="livesum")
WORKER_READY = Gauge(
    "llm_worker_ready", "1 once the worker's model is loaded", ["worker", "slice"], multiprocess_mode="livesum"
)
WORKER_ENGINE_CORE = Gauge(
    "llm_worker_engine_core", "1 for the vLLM engine core (its pid) a front-end worker shares with its slice's others",
    ["worker", "engine_core"], multiprocess_mode="livesum",
)
GPU_UTILIZATION = Gauge(
    "llm_gpu_utilization_ratio", "GPU busy share over NVML's last sample period", ["worker", "gpu"],
    multiprocess_mode="livesum",
)
GPU_MEMORY_USED = Gauge("llm_gpu_memory_used_bytes", "GPU memory in use", ["worker", "gpu"],
                        multiprocess_mode="livesum")
GPU_MEMORY_TOTAL = Gauge("llm_gpu_memory_total_bytes", "GPU memory in all", ["worker", "gpu"],
                         multiprocess_mode="livesum")


def exposition() -> tuple[bytes, str]:
    """Every worker's metrics in the Prometheus text format."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_states() -> list[dict]:
    """Each live worker's pid, slice, readiness and generation requests answered, read from the shared metric
    files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    workers, answered, cores = [], {}, {}
    for family in registry.collect():
        if family.name == "llm_worker_ready":
            for sample in family.samples:
                workers.append({"pid": int(sample.labels["worker"]), "slice": sample.labels["slice"],
                                "ready": sample.value == 1})
        elif family.name == "llm_worker_engine_core":
            cores.update({sample.labels["worker"]: sample.labels["engine_core"] for sample in family.samples
                          if sample.value == 1})
        elif family.name == "llm_worker_generation_requests":
            answered.update({sample.labels["worker"]: int(sample.value) for sample in family.samples
                             if sample.name.endswith("_total")})
    for worker in workers:
        worker["generation_requests"] = answered.get(str(worker["pid"]), 0)
        if str(worker["pid"]) in cores:  # a front end of a shared engine core: which one
            worker["engine_core"] = int(cores[str(worker["pid"])])
    return sorted(workers, key=lambda worker: worker["pid"])


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (called by the gunicorn master when a worker exits)."""
    multiprocess.mark_process_dead(pid)


def worker_loaded(slice_label: str, engine_core: str | None = None) -> None:
    worker = str(os.getpid())
    WORKER_READY.labels(worker, slice_label).set(1)
    if engine_core is not None:
        WORKER_ENGINE_CORE.labels(worker, engine_core).set(1)
    RUNNING.labels(worker).set(0)
    WAITING.labels(worker).set(0)


def start_gpu_sampler(interval_s: float = 2.0) -> None:
    """Publish this worker's GPUs' utilization and memory every `interval_s`, through NVML (no CUDA needed)."""
    visible = [item for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip().isdigit()]
    if not visible:
        return
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: no GPU metrics, nothing else changes
        return
    handles = {index: pynvml.nvmlDeviceGetHandleByIndex(int(index)) for index in visible}
    worker = str(os.getpid())

    def sample() -> None:
        while True:
            for index, handle in handles.items():
                try:
                    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    busy = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                except pynvml.NVMLError:
                    continue
                GPU_UTILIZATION.labels(worker, index).set(busy)
                GPU_MEMORY_USED.labels(worker, index).set(memory.used)
                GPU_MEMORY_TOTAL.labels(worker, index).set(memory.total)
            time.sleep(interval_s)

    threading.Thread(target=sample, name="gpu-metrics", daemon=True).start()


def engine_path_taken(path: str, prompts: int = 1) -> None:
    """Count prompts served by an engine path (the transformers engine: slots, continuous, generate,
    prompt_logprobs, or scored: a one-token generation answered from its prompt's scoring)."""
    ENGINE_PATHS.labels(path).inc(prompts)


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    if header and len(header) <= 128 and header.isprintable() and " " not in header:
        return header
    return uuid.uuid4().hex


_admitted_lock = threading.Lock()
_waiting_here = 0  # this worker's admitted requests that have not had a first token yet


def waiting_requests() -> int:
    """Requests of this worker waiting for their first token (what backpressure bounds)."""
    return _waiting_here


class RequestStats:
    """The counts and times of one HTTP request; engines/generation.py reports tokens, http/app.py closes it.

    A generation request is *waiting* from `admit()` until its first token and *running* from then until
    `close()`; the worker's gauges and the backpressure count follow those two states.
    """

    def __init__(self, route: str, request_id: str):
        self.route = route
        self.request_id = request_id
        self.started = time.monotonic()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.first_token_s: float | None = None
        self._state = "new"  # new -> waiting -> running -> closed
        self._admitted = False
        self._lock = threading.Lock()

    def admit(self, limit: int) -> bool:
        """Count this request as waiting, unless `limit` requests of this worker already wait (then False)."""
        global _waiting_here
        with _admitted_lock:
            if _waiting_here >= limit:
                return False
            _waiting_here += 1
        self._state, self._admitted = "waiting", True
        WAITING.labels(str(os.getpid())).inc()
        return True

    def _leave(self, to: str) -> None:
        global _waiting_here
        with self._lock:
            state, self._state = self._state, to
        worker = str(os.getpid())
        if state == "waiting":
            with _admitted_lock:
                _waiting_here -= 1
            WAITING.labels(worker).dec()
        elif state == "running":
            RUNNING.labels(worker).dec()
        if to == "running" and state == "waiting":
            RUNNING.labels(worker).inc()

    # reported by engines/generation.py, per generation (one prompt) and per choice

    def generation_started(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
        PROMPT_TOKENS.inc(prompt_tokens)

    def tokens(self, count: int) -> None:
        GENERATION_TOKENS.inc(count)
        with self._lock:
            self.generated_tokens += count

    def first_token(self, since_start_s: float) -> None:
        """A generation's first token, `since_start_s` after it started."""
        TIME_TO_FIRST_TOKEN.observe(since_start_s)
        with self._lock:
            first_of_request = self.first_token_s is None
            if first_of_request:
                self.first_token_s = time.monotonic() - self.started
        if first_of_request and self._state == "waiting":
            self._leave("running")

    def token_gap(self, seconds_per_token: float) -> None:
        INTER_TOKEN_LATENCY.observe(seconds_per_token)

    # called once the answer has been sent

    def close(self, status: int) -> None:
        self._leave("closed")
        total_s = time.monotonic() - self.started
        REQUESTS.labels(self.route, str(status)).inc()
        if self._admitted:
            WORKER_GENERATIONS.labels(str(os.getpid())).inc()
        REQUEST_DURATION.labels(self.route).observe(total_s)
        access_log.info(json.dumps({
            "request_id": self.request_id, "route": self.route, "status": status, "worker": os.getpid(),
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": None if self.first_token_s is None else round(self.first_token_s, 4),
            "total_s": round(total_s, 4),
        }))
