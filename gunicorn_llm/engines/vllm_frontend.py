"""A front end of its slice's shared vLLM engine core (`--infer_type vllm --workers-per-gpu K`, K > 1).

The worker loads no model: it attaches to the engine core its slice's supervisor launched (ops/slice_engines.py says
who launches it and why each attachment claims a client index of its own) with vLLM's own client for externally
launched engines, `AsyncLLM.from_vllm_config(..., client_addresses=, client_count=, client_index=)`, the client
`vllm serve --api-server-count` gives each of its API servers. Its K siblings do the same, so the slice's requests
from every worker run in one continuous batch while each worker's Python (HTTP, tokens to text, streams) runs under
its own GIL.

Requests go through the same interface as the worker's own engine (vllm_engine.py): handler threads hand "add" and
"abort" to one asyncio loop thread, which runs vLLM's client and publishes each request's outputs to its stream.

Faults: a watcher sees the core go (its process gone, or the supervisor launched another) and the worker dies, so
gunicorn replaces it and the replacement attaches to the new core. The first live front end of the core to see that a
sibling died (each looks twice a second; a replacement looks as it attaches) aborts what the dead one left running in
the core: it reads the dead client's outputs (vLLM queues them for the client address until someone listens), which
name its running requests, and aborts those through its own client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time

from gunicorn_llm.engines.base import EngineDied
from gunicorn_llm.engines.vllm_engine import Submission, VLLMEngine, _fail, engine_args
from gunicorn_llm.ops import slice_engines
from gunicorn_llm.settings import ServerSettings

log = logging.getLogger("gunicorn.error")
CORE_WAIT_S = 3600.0  # a slice's first core loads its model meanwhile: as long as a large model can take
WATCH_INTERVAL_S = 0.5
ORPHAN_DRAIN_S = 5.0  # how long a dead client's queued outputs are read for the requests it left running


class SharedCoreVLLMEngine(VLLMEngine):
    def __init__(self, model_path: str, model_name: str, settings: ServerSettings):
        import torch
        from vllm.usage.usage_lib import UsageContext

        on_gpu = torch.cuda.is_available()
        self.engine_core = "shared"
        self.model_name = model_name
        self.frontends = settings.workers_per_gpu
        self.slice_index = int(os.environ["GPU_SLICE_INDEX"])
        self.core, self.client_index, orphans = self._claim()
        config = engine_args(model_path, model_name, settings, on_gpu, shared=True, frontend=True).create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-frontend", daemon=True).start()
        self.engine = asyncio.run_coroutine_threadsafe(self._attach(config), self._loop).result()
        self._set_up(model_path, settings)
        self._tasks: dict[str, asyncio.Task] = {}
        self.engine_core_id = str(self.core.engine_pids[0])
        log.info("worker %s: front end %d of slice %d's engine core %s (generation %d)", os.getpid(),
                 self.client_index, self.slice_index, self.core.engine_pids, self.core.generation)
        if orphans:
            asyncio.run_coroutine_threadsafe(self._abort_orphans(orphans), self._loop)
        threading.Thread(target=self._watch_core, name="vllm-core-watch", daemon=True).start()

    def _claim(self):
        """Wait for the slice's core; claim a client index of it (asking for a new core when none is left)."""
        core = slice_engines.wait_until_ready(self.slice_index, CORE_WAIT_S)
        while True:
            index, orphans = slice_engines.claim_client_index(core, os.getpid())
            if index is not None:
                return core, index, orphans
            log.warning("worker %s: every client index of slice %d's engine core %s (generation %d) is claimed; "
                        "asking for a new engine core (the model loads again, the core's other front ends are "
                        "replaced)", os.getpid(), self.slice_index, core.engine_pids, core.generation)
            slice_engines.ask_for_new_core(core)
            core = slice_engines.wait_until_ready(self.slice_index, CORE_WAIT_S, newer_than=core.generation)

    async def _attach(self, config):
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_vllm_config(
            config, usage_context=UsageContext.OPENAI_API_SERVER, disable_log_stats=True,
            client_addresses={"input_address": self.core.inputs[self.client_index],
                              "output_address": self.core.outputs[self.client_index]},
            client_count=self.core.client_count, client_index=self.client_index)

    def describe(self) -> dict:
        return {**super().describe(), "engine_core_pid": self.core.engine_pids[0], "client_index": self.client_index,
                "core_generation": self.core.generation, "frontends": self.frontends,
                "engine_supervisor_pid": self.core.supervisor_pid}

    def close(self) -> None:
        # Only this worker's client closes: the core serves the slice's other workers.
        done = threading.Event()

        def shut() -> None:
            try:
                self.engine.shutdown()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(shut)
        done.wait(10.0)
        with contextlib.suppress(OSError):  # the server's engine directory may be gone with its master
            slice_engines.settle(self.core, self.client_index)

    # -- requests, on the loop thread ------------------------------------------------------------------------

    def _command(self, command: str, submission: Submission) -> None:
        self._loop.call_soon_threadsafe(self._handle, command, submission)

    def _handle(self, command: str, submission: Submission) -> None:
        request_id = submission.request_id
        if command == "add":
            self._running[request_id] = submission
            self._tasks[request_id] = self._loop.create_task(self._generate(submission))
        elif self._running.pop(request_id, None) is not None:
            self._tasks.pop(request_id, None).cancel()  # vLLM's client aborts a request whose generator is cancelled
            self._loop.create_task(self.engine.abort(request_id))

    async def _generate(self, submission: Submission) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for output in self.engine.generate(submission.engine_input(), submission.sampling,
                                                     submission.request_id):
                self._publish(submission, output)
        except asyncio.CancelledError:
            pass
        except EngineDeadError as error:
            _fail(submission, error)
            if not self.stopping:
                self.die(error)
        except Exception as error:  # noqa: BLE001 - e.g. a prompt longer than the context: that request fails
            _fail(submission, error)
        finally:
            self._running.pop(submission.request_id, None)
            self._tasks.pop(submission.request_id, None)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._running):
            submission = self._running.pop(request_id)
            self._tasks.pop(request_id, None).cancel()
            _fail(submission, error)

    # -- faults ----------------------------------------------------------------------------------------------

    def _watch_core(self) -> None:
        """Die when the core this worker attached to is gone: the replacement attaches to the supervisor's next.
        Meanwhile, abort what a sibling front end that died left running in the core."""
        while not self.stopping:
            time.sleep(WATCH_INTERVAL_S)
            state = slice_engines.read(self.slice_index)
            if state is not None and state.generation == self.core.generation and self.core.engine_alive():
                if orphans := slice_engines.take_orphans(self.core, os.getpid()):
                    asyncio.run_coroutine_threadsafe(self._abort_orphans(orphans), self._loop)
                continue
            if self.stopping:
                return
            error = EngineDied(f"slice {self.slice_index}'s engine core {self.core.engine_pids} is gone")
            self._loop.call_soon_threadsafe(self._fail_all, error)
            self.die(error)
            return

    async def _abort_orphans(self, indices: list[int]) -> None:
        """Abort the requests that dead front ends left running: their outputs name them (vLLM queued them for the
        dead client's address), and the core aborts requests by id whichever client asks."""
        import zmq
        import zmq.asyncio
        from vllm.v1.engine import EngineCoreOutputs
        from vllm.v1.serial_utils import MsgpackDecoder

        decoder = MsgpackDecoder(EngineCoreOutputs)
        context = zmq.asyncio.Context()
        sockets = []
        for index in indices:
            socket = context.socket(zmq.PULL)
            socket.bind(self.core.outputs[index])
            sockets.append(socket)
        aborted: set[str] = set()
        poller = zmq.asyncio.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        deadline = time.monotonic() + ORPHAN_DRAIN_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                for socket, _ in await poller.poll(timeout=left * 1000):
                    frames = await socket.recv_multipart(copy=False)
                    try:
                        outputs = decoder.decode(frames)
                    except Exception:  # noqa: BLE001 - not outputs (the core's "dead" message): nothing to abort
                        continue
                    running = {output.request_id for output in outputs.outputs if output.finish_reason is None}
                    if running - aborted:
                        await self.engine.engine_core.abort_requests_async(list(running - aborted))
                        aborted |= running
        finally:
            for socket in sockets:
                socket.close(linger=0)
            context.term()
        if aborted:
            log.info("worker %s: aborted %d requests that dead front ends %s of slice %d left running", os.getpid(),
                     len(aborted), indices, self.slice_index)
