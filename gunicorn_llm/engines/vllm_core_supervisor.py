"""A slice's vLLM engine core supervisor: `python -m gunicorn_llm.engines.vllm_core_supervisor SLICE_JSON MASTER_PID`.

Started by the gunicorn master, one per slice, when the slice's workers share one engine core (ops/slice_engines.py
says why and how workers attach). It pins itself to the slice, launches vLLM's engine core with vLLM's own
`launch_core_engines` (as `vllm serve --api-server-count` does), with one ZMQ address pair per client index, answers
the core's start-up handshake, publishes the core for the workers, and watches it: when the core dies, or every
client index has been claimed, it launches a new core (the workers of the old one see it go and are replaced).

It leads its own process group, which vLLM's processes inherit; on SIGTERM (from the master once the workers have
drained, or from the kernel when the master dies) it shuts the core down through vLLM and then ends whatever is
left of its group; when the master died, it also removes the server's engine directory, which the master would have.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing.connection
import os
import shutil
import signal
import sys

from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME, resolve_model
from gunicorn_llm.engines.vllm_engine import engine_args
from gunicorn_llm.ops import slice_engines
from gunicorn_llm.ops.dispatcher import Device, Slice, pin_slice
from gunicorn_llm.ops.engine_processes import end_own_group
from gunicorn_llm.settings import load_settings

log = logging.getLogger("gunicorn.error")
PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5
FAILED_STARTS_BEFORE_GIVING_UP = 3
SHUTDOWN_TIMEOUT_S = 10.0


def main(slice_json: str, master_pid: int) -> None:
    # The kernel's SIGTERM when the master dies (even by kill -9); checked after setting it, for a master that died
    # before.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != master_pid:
        return
    signal.signal(signal.SIGTERM, _exit_on_signal)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    described = json.loads(slice_json)
    slice_ = Slice(**{**described, "devices": tuple(Device(**d) for d in described["devices"]),
                      "cpu_cores": tuple(described["cpu_cores"])})
    pin_slice(slice_)
    # The engine core's processes are spawned: this process may not fork with vLLM's threads.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    supervisor = Supervisor(slice_)
    try:
        supervisor.run()
    finally:
        supervisor.stop()
        if os.getppid() != master_pid:
            # The master died without stopping the supervisors (kill -9): nobody else removes the engine directory.
            shutil.rmtree(slice_engines.engine_dir(), ignore_errors=True)


def _exit_on_signal(signum, frame):
    raise SystemExit(0)


class Supervisor:
    def __init__(self, slice_: Slice):
        self.slice = slice_
        self.settings = load_settings()
        self.manager = None  # vLLM's CoreEngineProcManager of the running core
        self.state: slice_engines.EngineState | None = None

    def run(self) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        model_path = self.settings.model_path or str(resolve_model(self.settings.model_name))
        name = self.settings.model_name or EMBEDDED_MODEL_NAME
        generation, failed_starts = 0, 0
        while True:
            try:
                self._launch(engine_args(model_path, name, self.settings, on_gpu, shared=True), generation)
                failed_starts = 0
            except Exception as error:  # noqa: BLE001 - a core that fails to start is retried, then given up
                failed_starts += 1
                log.exception("slice %d: engine core %d failed to start", self.slice.index, generation)
                self._stop_core()
                if failed_starts >= FAILED_STARTS_BEFORE_GIVING_UP:
                    self._publish(generation, False, [], failure=f"the engine core failed to start: {error}")
                    return
            else:
                self._watch(generation)
            generation += 1

    def _launch(self, args, generation: int) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.utils import EngineZmqAddresses, launch_core_engines
        from vllm.v1.executor import Executor

        config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        count = self.settings.workers_per_gpu * self.settings.client_indices_per_frontend
        inputs, outputs = slice_engines.addresses(self.slice.index, generation, count)
        self.state = None
        self._publish(generation, False, [], inputs=inputs, outputs=outputs)
        with launch_core_engines(config, Executor.get_class(config), False,
                                 EngineZmqAddresses(inputs=inputs, outputs=outputs)) as launched:
            # vLLM 0.26 yields (manager, coordinator, addresses, tensor queue), later ones an object
            self.manager = launched[0] if isinstance(launched, tuple) else launched.engine_manager
            pids = [process.pid for process in self.manager.processes]
            self._publish(generation, False, pids, inputs=inputs, outputs=outputs)
        # Leaving the block waited for the core's handshake: its model is loaded, its KV cache allocated.
        self._publish(generation, True, pids, inputs=inputs, outputs=outputs)
        log.info("slice %d: engine core %d ready (pid %s), %d client indices", self.slice.index, generation,
                 pids, count)

    def _watch(self, generation: int) -> None:
        """Return once the core has died or every client index is claimed."""
        while True:
            if multiprocessing.connection.wait(self.manager.sentinels(), timeout=WATCH_INTERVAL_S):
                log.error("slice %d: engine core %d exited (%s); launching a new one", self.slice.index, generation,
                          self.manager.finished_procs())
                break
            if slice_engines.renewal_asked(self.slice.index, generation):
                log.warning("slice %d: every client index of engine core %d is claimed; launching a new one",
                            self.slice.index, generation)
                break
        self._publish(generation, False, self.state.engine_pids, inputs=self.state.inputs,
                      outputs=self.state.outputs)
        self._stop_core()

    def _publish(self, generation: int, ready: bool, pids: list[int], inputs=(), outputs=(), failure=None) -> None:
        self.state = slice_engines.EngineState(self.slice.index, os.getpid(), generation, ready, list(pids),
                                               list(inputs), list(outputs), failure)
        slice_engines.publish(self.state)

    def _stop_core(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

    def stop(self) -> None:
        # The engine directory is gone when another slice's supervisor removed it after the master's death.
        with contextlib.suppress(OSError):
            if self.state is not None:
                self._publish(self.state.generation, False, self.state.engine_pids, inputs=self.state.inputs,
                              outputs=self.state.outputs, failure=self.state.failure or "stopped")
        try:
            self._stop_core()
        finally:
            ended = end_own_group()
            if ended:
                log.info("slice %d: ended the engine core's remaining processes %s", self.slice.index, ended)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
