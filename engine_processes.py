"""No engine process outlives its worker: each worker leads a process group, and the master ends what is left of it.

An engine may run parts of itself in processes of its own (vLLM's engine core, its tensor-parallel workers). Those
are not gunicorn's workers: when a worker is killed (kill -9, the OOM killer, a timeout), nothing tells them, and
they would hold the GPU that the worker's replacement is about to load onto. So each worker makes itself the leader
of a new process group as soon as it is forked, before its engine loads; every process started below it inherits
the group, however it was started and wherever it was re-parented (the group outlives its leader, and Linux does
not give its id to a new process while any member lives). When gunicorn's master reaps a worker, it kills the
worker's group and waits until no member is left, before it frees the worker's slice: the GPU memory is free again
before a replacement loads.

A worker that stops gracefully (SIGTERM, HUP, --max-requests) shuts its engine down itself; the sweep then finds
nothing. When the master dies, the workers notice and stop gracefully. (A process's environment cannot carry the
mark instead: vLLM's processes rename themselves with setproctitle, which overwrites what /proc shows of it.)
"""

from __future__ import annotations

import logging
import os
import signal
import time

import psutil

END_WAIT_S = 30.0

log = logging.getLogger("gunicorn.error")


def lead_own_group() -> None:
    """In the worker, before anything starts a process: what it starts belongs to this worker's group."""
    os.setpgid(0, 0)


def group_members(group: int) -> list[int]:
    """Live processes of a process group (zombies hold no memory and are left to whoever reaps them)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (OSError, psutil.Error):
            continue
    return members


def end_worker_group(worker_pid: int) -> list[int]:
    """In the master, once the worker is reaped: kill what is left of its group and wait until it is gone."""
    leftovers = group_members(worker_pid)
    if not leftovers:
        return []
    try:
        os.killpg(worker_pid, signal.SIGKILL)
    except ProcessLookupError:
        return []
    deadline = time.monotonic() + END_WAIT_S
    while (alive := group_members(worker_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive:
        log.error("processes %s of dead worker %s did not end within %.0f s", alive, worker_pid, END_WAIT_S)
    return leftovers
