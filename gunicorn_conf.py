"""gunicorn configuration: one worker per GPU slice (times --workers-per-gpu), each pinned before its model loads.

Flat settings first, then gunicorn's hooks with gunicorn's signatures. All values come from gunicorn_llm/settings.py
(the launcher sets them through environment variables). The master discovers GPUs through NVML only: it never
initialises CUDA, so forked workers start clean.
"""

import os
import shutil
import sys
import tempfile

from gunicorn_llm.ops import slice_engines, systemd_notify
from gunicorn_llm.ops.dispatcher import GPUDispatcher, NoFreeSliceError, cut_slices, discover_devices, pin_slice
from gunicorn_llm.ops.engine_processes import end_own_group, end_worker_group, lead_own_group
from gunicorn_llm.settings import VLLM_FRONT_ENDS_PER_GPU, load_settings

WORKER_BOOT_ERROR = 3  # gunicorn's status for a worker that cannot boot: the master stops instead of respawning

settings = load_settings()
# Every worker's metrics go to files in one directory per server (prometheus_client's multiprocess mode); it must
# exist, empty, before anything imports prometheus_client, and the workers inherit it.
# gunicorn runs this file again on every HUP, in the same master: only its first run sets the directory up.
if os.environ.get("GUNICORN_LLM_CONFIG_PID") != str(os.getpid()):
    os.environ["GUNICORN_LLM_CONFIG_PID"] = str(os.getpid())
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gunicorn-llm-metrics-")
        os.environ["GUNICORN_LLM_OWNS_METRICS_DIR"] = "1"  # made here, so removed at exit
    else:
        for stale in os.scandir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
            os.unlink(stale.path)
slices = cut_slices(discover_devices(settings.gpu_ids, settings.cuda_visible_devices, settings.cpu_workers),
                    settings.per_proc_gpus)
if ("WORKERS_PER_GPU" not in os.environ and settings.infer_type == "vllm" and not slices[0].is_cpu
        and settings.per_proc_gpus == 1):
    # The vLLM engine's default on single-GPU slices: front ends sharing each slice's engine core
    # (VLLM_FRONT_ENDS_PER_GPU says why; tensor-parallel slices keep one worker until measured). Set in the
    # environment, so the workers, the supervisors and a HUP's re-run of this file all see it.
    os.environ["WORKERS_PER_GPU"] = str(VLLM_FRONT_ENDS_PER_GPU)
    settings = load_settings()
dispatcher = GPUDispatcher(
    slices,
    holders_per_slice=settings.workers_per_gpu,
    state_file=settings.dispatcher_state,
)

wsgi_app = {"transformers": "transformers_url_m:app", "vllm": "vllm_url_m:app"}[settings.infer_type]
bind = f"{settings.host}:{settings.port}"
workers = dispatcher.worker_count
# systemd readiness (gunicorn_llm/ops/systemd_notify.py): workers learn how many must load before READY=1 is sent.
systemd_notify.prepare(workers)
# gthread: requests run on a thread pool while the main thread keeps heart-beating, so a long generation is never
# mistaken for a hung worker; the engine batches what the threads submit.
# gthread, closing its listeners when it starts to drain
worker_class = "gunicorn_llm.ops.draining_worker.DrainingThreadWorker"
threads = settings.threads
# gthread keeps only worker_connections - threads idle keep-alive connections: none at all once --threads reaches
# gunicorn's default of 1000, and every answer would then close its connection. The same room above any --threads.
worker_connections = settings.threads + 1000
timeout = settings.worker_timeout
graceful_timeout = settings.worker_timeout
keepalive = 5
# Recycling a worker frees whatever its process accumulated; its replacement acquires a free slice.
max_requests = settings.max_requests
max_requests_jitter = settings.max_requests // 10
proc_name = "gunicorn-llm"
# gunicorn's control socket sits at one per-user path: two servers on one host would fight over it.
control_socket_disable = True
# gunicorn_llm/http/app.py writes one structured line per request instead (tokens, time to first token)
accesslog = None
errorlog = "-"
loglevel = settings.log_level


def on_starting(server):
    slices = "; ".join(f"slice {s.index}: {s.label}" for s in dispatcher.slices)
    server.log.info(
        "serving %s with %s: %d workers over %d slices (%s), %d per slice, state %s",
        settings.model_name or "the embedded model", settings.infer_type, workers, len(dispatcher.slices),
        slices, settings.workers_per_gpu, settings.dispatcher_state,
    )
    if dispatcher.slices[0].is_cpu:
        server.log.warning("no GPU found (NVML absent or no devices): serving on CPU with %d workers", workers)


def when_ready(server):
    # Before the first fork: one vLLM engine core per slice, launched by a supervisor of its own, which the slice's
    # workers attach to as front ends (gunicorn_llm/ops/slice_engines.py). Kept on the arbiter: a HUP re-reads this
    # file, and the supervisors (and their loaded models) outlive it.
    if settings.shares_vllm_engine_core:
        server.slice_supervisors = slice_engines.start_supervisors(dispatcher.slices)


def post_fork(server, worker):
    lead_own_group()
    try:
        acquired = dispatcher.acquire_slice(os.getpid(), server.pid, wait_s=settings.effective_slice_wait)
    except NoFreeSliceError as error:
        worker.log.error("worker %s got no GPU slice: %s", os.getpid(), error)
        sys.exit(WORKER_BOOT_ERROR)
    pin_slice(acquired)
    worker.log.info("worker %s pinned to slice %d (%s)", os.getpid(), acquired.index, acquired.label)


def worker_exit(server, worker):
    from gunicorn_llm.http.app import loaded_engine  # in the worker, where the app is loaded

    engine = loaded_engine(worker.wsgi) if getattr(worker, "wsgi", None) is not None else None
    if engine is not None:
        engine.stopping = True
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - whatever it left running, the group's end below stops
            worker.log.exception("worker %s: the engine did not close cleanly", os.getpid())
    ended = end_own_group()  # the engine's own processes: else the exit waits on them forever
    if ended:
        worker.log.info("worker %s stopped its engine's processes %s", os.getpid(), ended)


def child_exit(server, worker):
    # imported here, in the master, only after PROMETHEUS_MULTIPROC_DIR is set above
    from gunicorn_llm.ops import metrics

    ended = end_worker_group(worker.pid)  # before the slice is free: then its GPU memory is free too
    if ended:
        server.log.warning("worker %s exited leaving processes %s; they were killed", worker.pid, ended)
    dispatcher.release_slice(worker.pid)
    metrics.mark_worker_dead(worker.pid)
    server.log.info("worker %s exited; its slice is free", worker.pid)


def on_exit(server):
    # The workers have drained and exited: their engine cores can stop now.
    slice_engines.stop_supervisors(getattr(server, "slice_supervisors", []))
    if os.environ.get("GUNICORN_LLM_OWNS_METRICS_DIR"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
