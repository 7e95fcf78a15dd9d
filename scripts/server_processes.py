"""Servers that benchmark and check scripts start: a free port, waiting until one is ready, stopping them all.

Each server runs in a session of its own (`start_new_session=True`), so that stopping it reaches its whole tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.request import urlopen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, workers: int | None, process: subprocess.Popen, timeout_s: float) -> None:
    """Until every worker has loaded (`workers`: this server's count, None: the count its /workers expects; 0:
    another server, ready once its /health answers). The next server starts only then: a vLLM engine sizing its
    cache fails when another process frees GPU memory meanwhile (this server's /health answers while its model
    loads, its /workers says when all have)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode} before it was ready")
        try:
            with urlopen(f"{url}/health", timeout=5):
                pass
            if workers == 0:
                return
            with urlopen(f"{url}/workers", timeout=5) as response:
                state = json.loads(response.read())
            if state["loaded"] >= (state["workers"] if workers is None else workers):
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s")


def stop_on_sigterm() -> None:
    """A SIGTERM (`timeout`'s, say) ends the script through its `finally` blocks, which stop the servers it
    started: they run in sessions of their own, so nothing else would, and a leftover holds the GPUs' memory."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def stop_servers(processes: list[subprocess.Popen], wait_s: float = 60) -> None:
    """SIGTERM to each server's process group; what has not ended after `wait_s` is killed, every process of the
    server's tree included (this server's workers lead process groups of their own, which a group kill misses)."""
    import psutil

    trees = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            trees[process.pid] = psutil.Process(process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            for child in trees.get(process.pid, []):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            process.wait()
