"""One vLLM engine core per slice, shared by the slice's front-end workers: who runs it, where it listens, who attaches.

With `--infer_type vllm --workers-per-gpu K` (K > 1), each slice runs one vLLM engine core and its K gunicorn workers
are that core's front ends (vLLM's `--api-server-count` set-up): each worker has its own GIL for HTTP, tokenizing,
streaming, and all of them feed the same continuous batch. The transport is vLLM's own: the engine core is launched
by vLLM's `launch_core_engines` with one input and one output ZMQ address per client, and each worker attaches with
`AsyncLLM.from_vllm_config(..., client_addresses=, client_count=, client_index=)`.

Who launches the engine core: a per-slice supervisor process (`python -m gunicorn_llm.engines.vllm_core_supervisor`)
that the gunicorn master starts before it forks the workers, in a session of its own so that the terminal's signals
reach only the master. The master never imports vLLM and never waits for a model to load; the supervisor launches the
engine core, answers vLLM's start-up handshake, watches the core, and launches a new one when it dies. The
supervisor ends with the master: the master stops it (SIGTERM) after its workers have drained, and the kernel sends
it SIGTERM if the master dies (PR_SET_PDEATHSIG); either way it ends its engine core's processes before it exits.

How a worker attaches, and why each attachment gets addresses of its own: vLLM's engine core sends its "ready"
message once per client address, when it starts, and a client waits for it before its first request; a replacement
client on a dead client's addresses would wait forever (vLLM cannot re-attach a client: its own server shuts down
when one of its API servers dies). So the supervisor gives the core `CLIENT_INDICES_PER_FRONTEND` (8) address
pairs per front end; each worker that attaches claims an unused pair (its `client_index`), and a replacement worker
claims a fresh one, whose ready message has waited in the engine's queue since the core started: it attaches in
seconds, with no model load. Once every pair of a core is claimed, the next worker logs it and asks the supervisor
for a new core: the supervisor stops the old core (its front ends see it go and are replaced) and launches a new one
(the model loads again), to which the asking worker and the replacements attach.

This module is the shared state (one JSON file per slice in the server's engine directory, written whole and
renamed; pair claims under a file lock), what `/workers` shows of it, and the master's side (start and stop the
supervisors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock

from gunicorn_llm.ops.engine_processes import end_worker_group

log = logging.getLogger("gunicorn.error")

ENGINE_DIR_ENV = "GUNICORN_LLM_ENGINE_DIR"
SUPERVISOR_MODULE = "gunicorn_llm.engines.vllm_core_supervisor"
SUPERVISOR_STOP_S = 30.0


@dataclass
class EngineState:
    """What a slice's supervisor publishes about its engine core."""

    slice_index: int
    supervisor_pid: int
    generation: int  # counts the cores launched for this slice: a worker attached to an older one re-attaches
    ready: bool
    engine_pids: list[int]  # vLLM's engine core process (its own workers run below it, in its process group)
    inputs: list[str]  # one ZMQ address pair per client index
    outputs: list[str]
    failure: str | None = None  # why the supervisor gave up

    @property
    def client_count(self) -> int:
        return len(self.inputs)

    def engine_alive(self) -> bool:
        return bool(self.engine_pids) and all(_runs(pid) for pid in self.engine_pids)


def engine_dir() -> Path:
    return Path(os.environ[ENGINE_DIR_ENV])


def make_engine_dir() -> str:
    """In the master, once: a private directory for the slices' state and ZMQ sockets, inherited by every child."""
    if not os.environ.get(ENGINE_DIR_ENV):
        # Short: a Unix socket's path is limited to about 107 bytes.
        os.environ[ENGINE_DIR_ENV] = tempfile.mkdtemp(prefix="gllm-")
    return os.environ[ENGINE_DIR_ENV]


def addresses(slice_index: int, generation: int, count: int) -> tuple[list[str], list[str]]:
    base = engine_dir()
    return ([f"ipc://{base}/s{slice_index}g{generation}i{n}" for n in range(count)],
            [f"ipc://{base}/s{slice_index}g{generation}o{n}" for n in range(count)])


def publish(state: EngineState) -> None:
    _write_whole(_state_path(state.slice_index), json.dumps(asdict(state)))


def _write_whole(path: Path, text: str) -> None:
    """Written aside and renamed: a reader never sees a part, and a writer killed midway (kill -9, or a worker's
    exit ending its watcher thread) leaves the old file whole."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    scratch.write_text(text)
    os.replace(scratch, path)


def read(slice_index: int) -> EngineState | None:
    try:
        return EngineState(**json.loads(_state_path(slice_index).read_text()))
    except FileNotFoundError:
        return None


def wait_until_ready(slice_index: int, timeout_s: float, newer_than: int = -1) -> EngineState:
    """The slice's engine once it is ready (and of a generation after `newer_than`); RuntimeError when its
    supervisor gave up or is gone, TimeoutError past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = read(slice_index)
        if state is not None:
            if state.failure or not _runs(state.supervisor_pid):
                raise RuntimeError(f"slice {slice_index}'s engine core supervisor stopped: {state.failure or 'gone'}")
            if state.ready and state.generation > newer_than and state.engine_alive():
                return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"slice {slice_index}'s engine core was not ready within {timeout_s:.0f} s")
        time.sleep(0.2)


def claim_client_index(state: EngineState, pid: int) -> tuple[int | None, list[int]]:
    """Claim an unused client index of the slice's engine core for `pid`: (the index or None when every one is
    claimed, the indices whose claimants died and whose requests nobody has aborted yet, now this pid's to abort)."""
    with _claims(state) as claims:
        orphans = _take_orphans(claims, pid)
        free = next((n for n in range(state.client_count) if str(n) not in claims), None)
        if free is not None:
            claims[str(free)] = {"pid": pid}
    return free, orphans


def take_orphans(state: EngineState, pid: int) -> list[int]:
    """The client indices whose claimants died since anyone looked, now `pid`'s to abort the requests of (a live
    sibling front end looks every second, so a dead one's requests are aborted at once, not when it is replaced)."""
    with _claims(state) as claims:
        return _take_orphans(claims, pid)


def settle(state: EngineState, index: int) -> None:
    """A front end that stops gracefully has nothing left running: nobody needs to abort its requests."""
    with _claims(state) as claims:
        claims[str(index)]["settled"] = os.getpid()


def _take_orphans(claims: dict, pid: int) -> list[int]:
    orphans = [int(n) for n, claim in claims.items() if not claim.get("settled") and not _runs(claim["pid"])]
    for n in orphans:
        claims[str(n)]["settled"] = pid
    return orphans


@contextlib.contextmanager
def _claims(state: EngineState):
    """The claims on the core's client indices (index -> claimant), read and written back under the file lock."""
    path = engine_dir() / f"claims-s{state.slice_index}g{state.generation}.json"
    with FileLock(str(path) + ".lock"):
        read = path.read_text() if path.exists() else "{}"
        claims = json.loads(read)
        yield claims
        if (written := json.dumps(claims)) != read:
            _write_whole(path, written)


def ask_for_new_core(state: EngineState) -> None:
    """Every client index of the core is claimed: ask its supervisor to launch a fresh core."""
    (engine_dir() / f"renew-s{state.slice_index}g{state.generation}").touch()


def renewal_asked(slice_index: int, generation: int) -> bool:
    return (engine_dir() / f"renew-s{slice_index}g{generation}").exists()


def described() -> list[dict]:
    """The server's shared engine cores as `/workers` shows them (none unless its workers share cores): per slice,
    its supervisor, its core's processes, how many cores it has launched, whether it is ready."""
    if not os.environ.get(ENGINE_DIR_ENV):
        return []
    states = []
    for path in sorted(engine_dir().glob("slice*.json")):
        with contextlib.suppress(FileNotFoundError, ValueError):  # a server that is stopping
            state = EngineState(**json.loads(path.read_text()))
            states.append({"slice": state.slice_index, "supervisor_pid": state.supervisor_pid,
                           "engine_core_pids": state.engine_pids, "generation": state.generation,
                           "ready": state.ready, "client_count": state.client_count, "failure": state.failure})
    return states


def _state_path(slice_index: int) -> Path:
    return engine_dir() / f"slice{slice_index}.json"


def _runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- the master's side ---------------------------------------------------------------------------------------------


def start_supervisors(slices) -> list[subprocess.Popen]:
    """In the master, before the workers are forked: one supervisor per slice, each launching its engine core."""
    make_engine_dir()
    supervisors = []
    for slice_ in slices:
        supervisors.append(subprocess.Popen(
            [sys.executable, "-m", SUPERVISOR_MODULE, json.dumps(asdict(slice_)), str(os.getpid())],
            start_new_session=True,  # Ctrl-C and the terminal's signals go to the master, which drains first
        ))
        log.info("slice %d (%s): engine core supervisor %d started", slice_.index, slice_.label, supervisors[-1].pid)
    return supervisors


def stop_supervisors(supervisors: list[subprocess.Popen], timeout_s: float = SUPERVISOR_STOP_S) -> None:
    """In the master, once its workers are gone: stop each supervisor (it stops its engine core) and wait."""
    for supervisor in supervisors:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for supervisor in supervisors:
        try:
            supervisor.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("engine core supervisor %d did not stop within %.0f s", supervisor.pid, timeout_s)
        except ChildProcessError:  # gunicorn's master reaps every child: already reaped is gone
            pass
        # Whatever is left of its group (a supervisor killed before it could stop its core): killed, waited for.
        if leftovers := end_worker_group(supervisor.pid):
            log.warning("engine core supervisor %d left processes %s; they were killed", supervisor.pid, leftovers)
    if supervisors:
        shutil.rmtree(engine_dir(), ignore_errors=True)
