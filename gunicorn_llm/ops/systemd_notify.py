"""systemd readiness: READY=1 once every gunicorn worker has loaded its model, not when gunicorn's master boots.

Under `Type=notify` (deploy/gunicorn-llm.service) systemd passes a socket in NOTIFY_SOCKET and waits for READY=1.
gunicorn's master sends READY=1 itself as soon as it listens, long before any worker has a model, so:

1. `start_gunicorn.sh` moves the socket aside before it execs gunicorn (LLM_NOTIFY_SOCKET=$NOTIFY_SOCKET; unset
   NOTIFY_SOCKET): gunicorn never sees it and sends nothing.
2. `gunicorn_conf.py` calls `prepare(workers)` in the master. It exports LLM_EXPECTED_WORKERS (the worker count) and,
   under systemd only, creates the server's registry of loaded workers: an anonymous memory file (memfd) that every
   forked worker inherits. Being anonymous it is private to this server (two servers on one host cannot mix their
   counts), needs no writable path (the unit's ProtectSystem=strict stays strict) and vanishes with the server.
3. Each worker calls `worker_loaded()` right after its model loaded and its /ready answers 200
   (serving.EngineSlot._build). Under a POSIX record lock on the registry (released by the kernel if the worker
   dies, so a `kill -9` cannot wedge it) the worker records itself by pid and start time, drops entries of workers
   that have died since, and counts the live loaded workers of its master. The worker that brings the count to
   LLM_EXPECTED_WORKERS sends `READY=1`, `MAINPID=<master pid>` and a STATUS line, and marks the registry notified;
   every other load (the first workers, replacements after a crash or --max-requests recycling, a reload) sends a
   STATUS line only. So READY=1 is sent exactly once per master, and only once all of its workers serve.

The unit sets NotifyAccess=all because the message comes from a worker, not from the main process (the master).
Without LLM_NOTIFY_SOCKET (not under systemd, or NOTIFY_SOCKET unset) every function here does nothing.
Messages follow sd_notify(3): one datagram of newline-separated KEY=VALUE lines to a unix socket given by path, or
by an abstract name written with a leading '@'.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket

import psutil

SOCKET_ENV = "LLM_NOTIFY_SOCKET"  # the launcher puts systemd's NOTIFY_SOCKET here, out of gunicorn's sight
EXPECTED_WORKERS_ENV = "LLM_EXPECTED_WORKERS"  # set by prepare() in the master; inherited by every worker

log = logging.getLogger("gunicorn.error")

_registry_fd: int | None = None  # the memfd prepare() created in the master; forked workers inherit it


def notify(state: str) -> bool:
    """Send one sd_notify message (newline-separated KEY=VALUE lines); False when there is no socket or it failed."""
    address = os.environ.get(SOCKET_ENV)
    if not address:
        return False
    if address.startswith("@"):  # abstract socket namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as error:
        log.warning("systemd notification %r to %s failed: %s", state.replace("\n", " "), address, error)
        return False


def prepare(expected_workers: int) -> None:
    """In the gunicorn master, before workers fork: export the worker count and create the registry."""
    global _registry_fd
    os.environ[EXPECTED_WORKERS_ENV] = str(expected_workers)
    if not os.environ.get(SOCKET_ENV):
        return
    if _registry_fd is None:  # a reload (HUP) re-reads the config: keep the registry, and whether READY was sent
        _registry_fd = os.memfd_create("gunicorn-llm-ready")  # close-on-exec: forked workers keep it, exec drops it
    notify(f"STATUS=loading the model in {expected_workers} worker(s)")


def worker_loaded() -> None:
    """In a worker whose model has loaded: record it; the worker completing the set sends READY=1. Never raises."""
    if not os.environ.get(SOCKET_ENV):
        return
    try:
        _record_and_notify(os.getpid(), os.getppid())
    except Exception:  # readiness reporting must never take a serving worker down
        log.exception("worker %s: systemd readiness notification failed", os.getpid())


def _record_and_notify(pid: int, master_pid: int) -> None:
    expected = int(os.environ.get(EXPECTED_WORKERS_ENV, "1"))
    if _registry_fd is None:
        # Only when gunicorn ran with a config that did not call prepare(): no way to count, so do not hold the
        # service back forever.
        log.warning("worker %s: no readiness registry (prepare() not called in the master); sending READY=1", pid)
        notify(f"READY=1\nMAINPID={master_pid}\nSTATUS=serving (worker count unknown)")
        return
    fcntl.lockf(_registry_fd, fcntl.LOCK_EX)
    try:
        registry = _read(_registry_fd)
        loaded = {
            int(worker): started
            for worker, started in registry.get("loaded", {}).items()
            if _is_live_worker(int(worker), started, master_pid)
        }
        loaded[pid] = psutil.Process(pid).create_time()
        first_time = len(loaded) >= expected and not registry.get("notified", False)
        notified = registry.get("notified", False) or first_time
        _write(_registry_fd, {"notified": notified, "loaded": {str(worker): t for worker, t in loaded.items()}})
        progress = f"{len(loaded)} of {expected} worker(s) loaded the model"
        if first_time:
            notify(f"READY=1\nMAINPID={master_pid}\nSTATUS=ready: {progress}")
            log.info("worker %s: all %d workers loaded their models; told systemd READY=1", pid, expected)
        elif notified:
            notify(f"STATUS=serving: worker {pid} (re)loaded the model; {progress}")
        else:
            notify(f"STATUS=loading: {progress}")
    finally:
        fcntl.lockf(_registry_fd, fcntl.LOCK_UN)


def _is_live_worker(pid: int, started: float, master_pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return (
            process.create_time() == started
            and process.ppid() == master_pid
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _read(fd: int) -> dict:
    size = os.fstat(fd).st_size
    return json.loads(os.pread(fd, size, 0)) if size else {}


def _write(fd: int, registry: dict) -> None:
    data = json.dumps(registry).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
