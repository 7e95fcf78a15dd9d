"""vLLM's engine core in a process of its own (`--vllm-engine-core process`, the default on GPUs), on CPU: no engine
process outlives its worker, whatever ends the worker, and the old engine is gone before the replacement loads.

A real server (1 CPU worker, vLLM's CPU build) under load from client threads. Its engine runs as processes below
the worker (vLLM's engine core and its model worker), all in the worker's process group; they are counted:
- kill -9 of the worker: when the replacement worker exists, no process of the old worker's group is left (the
  master ended them before it freed the slice), and the replacement serves;
- HUP: the old worker's engine ends with it, the new one serves;
- SIGTERM: the master exits 0 and nothing of the server is left, and nothing had to be killed;
- kill -9 of the master (a second server): the worker notices, stops its engine and exits; nothing is left.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from benchkit.fault_load import Load, summary
from gunicorn_llm.ops.engine_processes import group_members
from test_faults import acceptable_under_kill, alive, wait_until

# A 1 GiB KV cache and the engine core's own process, as on GPUs; a short drain keeps stops quick.
ARGS = ("--infer_type", "vllm", "--cpu-workers", "1", "--vllm-engine-core", "process", "--timeout", "20")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
LOAD_S = 400


def engine_processes(worker: int) -> list[int]:
    """The processes of a worker's group besides the worker: its engine's."""
    return [pid for pid in group_members(worker) if pid != worker]


def the_worker(server) -> int:
    (worker,) = server.wait_until_ready(workers=1, timeout_s=LOAD_S)
    return worker


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(*ARGS, env=ENV)
    server.worker = the_worker(server)
    return server


def test_the_engine_core_runs_in_processes_of_the_workers_group(server):
    engine = engine_processes(server.worker)
    names = " ".join(psutil.Process(pid).name() + " " + " ".join(psutil.Process(pid).cmdline()) for pid in engine)
    assert len(engine) >= 2 and "EngineCore" in names, names  # the engine core and its model worker at least
    assert server.infer(["The capital of France is"], temperature=0, max_tokens=4)


@pytest.mark.timeout(LOAD_S + 120)
def test_kill_9_of_the_worker_under_load_ends_its_engine_before_the_replacement_loads(server):
    victim, engine = server.worker, engine_processes(server.worker)
    with Load(server.url, clients=4, max_tokens=8, max_s=LOAD_S) as load:
        wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 2, 60, "the load is being answered")
        os.kill(victim, signal.SIGKILL)
        replacement = wait_until(lambda: next(iter(server.worker_pids() - {victim}), None), 60, "a new worker")
        left_when_replaced = [pid for pid in engine if alive(pid)]
        server.worker = the_worker(server)
        wait_until(lambda: sum(o.ok and o.worker == server.worker for o in load.snapshot()) >= 1, 60,
                   "the replacement answers")
        outcomes = load.stop()
    print(f"\nkill -9 of the worker: engine {engine}; replacement {replacement}; load {summary(outcomes)}")
    assert left_when_replaced == [], f"engine processes {left_when_replaced} outlived their worker"
    assert server.worker == replacement and len(engine_processes(replacement)) >= 2
    assert all(acceptable_under_kill(o) for o in outcomes), summary(outcomes)


@pytest.mark.timeout(LOAD_S + 120)
def test_hup_under_load_ends_the_old_engine(server):
    old, engine = server.worker, engine_processes(server.worker)
    with Load(server.url, clients=4, max_tokens=8, max_s=LOAD_S) as load:
        wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 2, 60, "the load is being answered")
        os.kill(server.process.pid, signal.SIGHUP)
        wait_until(lambda: not alive(old), LOAD_S, "the old worker exits")
        wait_until(lambda: not [pid for pid in engine if alive(pid)], 30, "the old engine ends")
        server.worker = the_worker(server)
        wait_until(lambda: sum(o.ok and o.worker == server.worker for o in load.snapshot()) >= 1, 60,
                   "the new worker answers")
        outcomes = load.stop()
    print(f"\nHUP: old engine {engine}, new worker {server.worker}; load {summary(outcomes)}")
    assert all(acceptable_under_kill(o) for o in outcomes), summary(outcomes)


@pytest.mark.timeout(180)
def test_sigterm_under_load_leaves_no_process(server):
    tree = group_members(server.worker) + [server.process.pid]
    with Load(server.url, clients=4, max_tokens=8, max_s=120) as load:
        wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 2, 60, "the load is being answered")
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=120) == 0
        outcomes = load.stop()
    wait_until(lambda: not [pid for pid in tree if alive(pid)], 30, "every process of the server ends")
    assert not [o for o in outcomes if o.hung], summary(outcomes)
    # The engine stopped on SIGTERM, nothing had to be killed: vLLM's client shut its engine core down (so vLLM
    # did not report a core that exited unexpectedly), and the resource tracker (which ignores SIGTERM) ended once
    # the others had, without being waited for through the grace time.
    log = server.log()
    assert "stopped its engine's processes" in log
    assert "did not stop within" not in log and "exited unexpectedly" not in log, log[-3000:]


@pytest.mark.timeout(LOAD_S + 120)
def test_kill_9_of_the_master_under_load_leaves_no_engine_process(start_server):
    server = start_server(*ARGS, env=ENV)
    worker = the_worker(server)
    tree = group_members(worker)
    assert len(tree) >= 3
    try:
        with Load(server.url, clients=4, max_tokens=8, max_s=120) as load:
            wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 2, 60, "the load is being answered")
            killed_at = time.monotonic()
            os.kill(server.process.pid, signal.SIGKILL)
            wait_until(lambda: not [pid for pid in tree if alive(pid)], 60, "the worker and its engine end")
            gone_s = time.monotonic() - killed_at
            outcomes = load.stop()
        print(f"\nkill -9 of the master: worker and engine {tree} gone after {gone_s:.1f} s; {summary(outcomes)}")
        assert not [o for o in outcomes if o.hung], summary(outcomes)
    finally:
        for pid in tree:  # never leave a process of this test behind, whatever failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
