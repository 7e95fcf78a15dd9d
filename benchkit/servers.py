"""Server processes that the scripts and the tests start: a free port, start, wait until ready, stop.

Each server runs in a session of its own (`start_new_session=True`), so that stopping it reaches its whole tree, and
writes its output to a log file whose tail goes into every error about it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "start_gunicorn.sh"
# what a poll of a server that is not up yet (or busy loading) may raise: refused, reset, timed out, 503
NOT_UP = (OSError, http.client.HTTPException, ValueError)


class ServerNotReady(RuntimeError):
    """The server exited, or was not ready in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(port: int, args: list[str]) -> list[str]:
    """This server through its launcher, start_gunicorn.sh."""
    return [str(LAUNCHER), "--port", str(port), *args]


class ServerProcess:
    """A server started from a command line, listening on 127.0.0.1:`port`, its output in `log_path`."""

    def __init__(self, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.command, self.port, self.log_path = command, port, Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @classmethod
    def launch(cls, args: list[str], log_path: Path, env: dict[str, str] | None = None,
               port: int | None = None) -> ServerProcess:
        """This server through its launcher, start_gunicorn.sh, on `port` (default: a free one)."""
        port = port or free_port()
        return cls(launcher_command(port, args), port, log_path, env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _not_ready(self, why: str) -> ServerNotReady:
        return ServerNotReady(f"{self.url}: {why}; the end of its log:\n{self.log()[-3000:]}")

    def _check_alive(self, deadline: float, what: str) -> None:
        if self.process.poll() is not None:
            raise self._not_ready(f"the server exited with {self.process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise self._not_ready(f"not {what} in time")

    def worker_pids(self) -> set[int]:
        """This server's workers: the children of its gunicorn master (the launcher execs gunicorn), but for the
        slices' vLLM engine core supervisors (gunicorn_llm/engines/vllm_core_supervisor.py), which it starts too."""
        import psutil

        workers = set()
        for child in psutil.Process(self.process.pid).children():
            try:
                if "vllm_core_supervisor" not in " ".join(child.cmdline()):
                    workers.add(child.pid)
            except psutil.NoSuchProcess:
                continue
        return workers

    def wait_loaded(self, workers: int | None, timeout_s: float) -> None:
        """Until every worker has loaded its model, by this server's /workers (`workers`: how many; None: the count
        /workers expects). `workers=0`: another server, ready once its /health answers. Scripts start the next
        server only then: a vLLM engine sizing its cache fails when another process frees GPU memory meanwhile (this
        server's /health answers while its model loads)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive(deadline, "it was ready")
            try:
                with urlopen(f"{self.url}/health", timeout=5):
                    pass
                if workers == 0:
                    return
                with urlopen(f"{self.url}/workers", timeout=5) as response:
                    state = json.loads(response.read())
                if state["loaded"] >= (state["workers"] if workers is None else workers):
                    return
            except NOT_UP:
                pass
            time.sleep(1)

    def ready_workers(self, workers: int, timeout_s: float) -> dict[int, dict]:
        """Poll /ready until `workers` distinct workers of this server answered 200; their pid -> /ready answer
        (its slice, and what the engine describes). A worker that is no longer the master's child (one replaced
        meanwhile) does not count."""
        ready: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(ready) < workers:
            self._check_alive(deadline, f"{workers} workers were ready (only {len(ready)})")
            try:
                with urlopen(f"{self.url}/ready", timeout=5) as response:
                    answer = json.loads(response.read())
                if answer["pid"] in self.worker_pids():
                    ready[answer["pid"]] = answer
            except NOT_UP:  # not listening yet, or busy loading: ask again
                pass
            time.sleep(0.2)
        return ready

    def stop(self, wait_s: float = 60) -> None:
        stop_servers([self], wait_s)


def stop_servers(servers: list[ServerProcess], wait_s: float = 60) -> None:
    """SIGTERM to each running server's process group; what has not ended after `wait_s` is killed, every process
    of the server's tree included (this server's workers lead process groups of their own, which a group kill
    misses)."""
    import psutil

    running = [server.process for server in servers if server.process.poll() is None]
    trees = {}
    for process in running:
        with contextlib.suppress(psutil.Error):
            trees[process.pid] = psutil.Process(process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            for child in trees.get(process.pid, []):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            process.wait()


def stop_on_sigterm() -> None:
    """A SIGTERM (`timeout`'s, say) ends the script through its `finally` blocks and `with` exits, which stop the
    servers it started: they run in sessions of their own, so nothing else would, and a leftover holds the GPUs'
    memory."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


class Servers(contextlib.AbstractContextManager):
    """The servers a script starts: all stopped when the block ends, however it ends (a SIGTERM included)."""

    def __init__(self, stop_wait_s: float = 60):
        self.started: list[ServerProcess] = []
        self.stop_wait_s = stop_wait_s

    def __enter__(self) -> Servers:
        stop_on_sigterm()
        return self

    def add(self, server: ServerProcess) -> ServerProcess:
        print("$", " ".join(server.command), flush=True)
        self.started.append(server)
        return server

    def __exit__(self, *exc) -> None:
        stop_servers(self.started, self.stop_wait_s)
