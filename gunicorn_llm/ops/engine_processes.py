"""No engine process outlives its worker: each worker leads a process group, and the master ends what is left of it.

An engine may run parts of itself in processes of its own (vLLM's engine core, its tensor-parallel workers). Those
are not gunicorn's workers: when a worker is killed (kill -9, the OOM killer, a timeout), nothing tells them, and
they would hold the GPU that the worker's replacement is about to load onto. So each worker makes itself the leader
of a new process group as soon as it is forked, before its engine loads; every process started below it inherits
the group, however it was started and wherever it was re-parented (the group outlives its leader, and Linux does
not give its id to a new process while any member lives). When gunicorn's master reaps a worker, it kills the
worker's group and waits until no member is left, before it frees the worker's slice: the GPU memory is free again
before a replacement loads.

A worker that stops gracefully (SIGTERM, HUP, --max-requests, its master gone) ends its group's other processes
itself as it exits (gunicorn's worker_exit hook), waiting a bounded time: Python's exit would otherwise wait forever
for a child process nobody told to stop. And a dead worker's slice counts as held while any process of its group
lives (dispatcher.py), so a replacement never loads onto GPU memory an old engine still holds.

Why a process group and not a mark in the environment: vLLM's processes rename themselves with setproctitle, which
overwrites what /proc shows of their environment.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import psutil

END_WAIT_S = 30.0
STOP_GRACE_S = 10.0  # an engine asked to stop (SIGTERM) gets this long before it is killed

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
    if leftovers:
        _signal_and_wait(leftovers, signal.SIGKILL, END_WAIT_S, f"processes of dead worker {worker_pid}")
    return leftovers


def end_own_group(grace_s: float = STOP_GRACE_S) -> list[int]:
    """In a worker that is exiting: stop the other processes of its group (SIGTERM, then SIGKILL after `grace_s`).

    The worker's multiprocessing resource tracker (vLLM's engine processes are spawned, which starts one) ignores
    SIGTERM: it ends once no process holds its pipe, and then unlinks the shared memory the others left behind. So
    it is not waited for with them, and once they are gone the worker lets go of the pipe and waits for it to end.
    """
    me = os.getpid()
    if os.getpgid(0) != me:
        return []
    others = [pid for pid in group_members(me) if pid != me]
    if not others:
        return []
    tracker = _resource_tracker_pid()
    engine = [pid for pid in others if pid != tracker]
    stuck = _signal_and_wait(engine, signal.SIGTERM, grace_s, "engine processes")
    if not stuck and tracker in others:
        _stop_resource_tracker()
    if left := [pid for pid in others if _runs(pid)]:
        log.warning("engine processes %s did not stop within %.0f s of SIGTERM; killing them", left, grace_s)
        _signal_and_wait(left, signal.SIGKILL, END_WAIT_S, "engine processes")
    return others


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _stop_resource_tracker() -> None:
    """Close this process's end of the tracker's pipe and wait for the tracker to clean up and exit (it can: every
    other process that held the pipe has ended)."""
    from multiprocessing import resource_tracker

    try:
        resource_tracker._resource_tracker._stop()
    except Exception as error:  # noqa: BLE001 - a private interface: if it changed, the tracker is killed instead
        log.warning("could not stop the resource tracker (%s); killing it", error)


def _signal_and_wait(pids: list[int], sig: int, wait_s: float, what: str) -> list[int]:
    """Signal the processes and wait up to `wait_s` for them to end; the ones still running."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while (alive := [pid for pid in pids if _runs(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive and sig == signal.SIGKILL:
        log.error("%s %s did not end within %.0f s", what, alive, wait_s)
    return alive


def _runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
