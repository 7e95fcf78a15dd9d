"""Two front-end workers sharing one vLLM engine core (`--workers-per-gpu 2` with vLLM), on CPU, and its faults.

A real server (1 CPU slice, 2 workers, vLLM's CPU build): one engine core process, launched by the slice's supervisor,
serves both workers, which attach with vLLM's client for externally launched engines. Processes are counted:
- both workers answer, through the one core; /ready, /workers, /metrics and the headers name it;
- kill -9 of one front end while both have requests running: the other's stream goes on to its end, the dead one's
  requests are aborted in the core, and the replacement attaches to the same core (no model load);
- HUP under load: no request fails, both front ends are replaced, and the new ones attach to the same core;
- kill -9 of the engine core: the workers report unready and are replaced, and the slice serves again from a new core;
- SIGTERM: a running stream finishes, then no process of the server is left;
- a second server, with one client index per front end (CLIENT_INDICES_PER_FRONTEND=1): a replacement finds every
  index claimed, says so, and the slice recovers on a new core; then kill -9 of its master: no engine core survives,
  and the supervisor removes the engine directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import psutil
import pytest
import requests

from benchkit.fault_load import Load, summary
from conftest import took_deprecated_vllm_prompts
from gunicorn_llm.ops.slice_engines import ENGINE_DIR_ENV
from test_faults import alive, descendants, wait_until

# --timeout is also how long a request waits for a loading worker: a HUP's new front ends import vLLM before they
# attach (20-60 s on a busy 2-core machine), and requests sent meanwhile wait for them.
ARGS = ("--infer_type", "vllm", "--cpu-workers", "1", "--workers-per-gpu", "2", "--timeout", "120")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
LOAD_S = 400
CORE_READY = re.compile(r"engine core \d+ ready")  # the supervisor's line once a core has loaded its model


def engine_cores(server) -> list[int]:
    """The server's vLLM engine core processes (vLLM names them VLLM::EngineCore)."""
    cores = []
    for pid in descendants(server.process.pid):
        try:
            if "EngineCore" in psutil.Process(pid).name():
                cores.append(pid)
        except psutil.NoSuchProcess:
            continue
    return cores


def engine_directory(server) -> str:
    """The server's engine directory (its master makes it; the supervisors inherit its path)."""
    supervisor = requests.get(f"{server.url}/workers").json()["engine_cores"][0]["supervisor_pid"]
    return psutil.Process(supervisor).environ()[ENGINE_DIR_ENV]


def session_to(server, worker: int, timeout_s: float = 30) -> requests.Session:
    """A keep-alive connection that the given worker accepted (the kernel picks a worker per connection)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        session = requests.Session()
        if int(session.get(f"{server.url}/health", timeout=10).headers["X-Worker-Pid"]) == worker:
            return session
        session.close()
    raise AssertionError(f"no connection reached worker {worker} within {timeout_s} s")


class Stream(threading.Thread):
    """A streamed completion on one session, its chunks timed as they arrive."""

    def __init__(self, session: requests.Session, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.session, self.url, self.max_tokens = session, url, max_tokens
        self.chunks: list[float] = []
        self.finished, self.error = False, None

    def run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        try:
            with self.session.post(f"{self.url}/v1/completions", json=body, stream=True, timeout=300) as response:
                for line in response.iter_lines():
                    if line == b"data: [DONE]":
                        self.finished = True
                    elif line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["text"]:
                        self.chunks.append(time.monotonic())
        except requests.RequestException as error:
            self.error = type(error).__name__


def ready_answers(server, workers: int = 2) -> dict[int, dict]:
    return server.ready_workers(workers, LOAD_S)


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(*ARGS, env=ENV)
    server.ready = ready_answers(server)
    return server


def test_both_workers_answer_through_one_engine_core(server):
    (core,) = engine_cores(server)
    answers = list(server.ready.values())
    assert [a["engine_core_pid"] for a in answers] == [core, core]
    assert sorted(a["client_index"] for a in answers) == [0, 1] and {a["frontends"] for a in answers} == {2}
    listed = requests.get(f"{server.url}/workers").json()["ready"]
    assert {w["pid"]: w["engine_core"] for w in listed} == {pid: core for pid in server.ready}
    assert f'engine_core="{core}"' in requests.get(f"{server.url}/metrics").text  # the monitor page's data
    answered = {}
    for pid in server.ready:
        with session_to(server, pid) as session:
            response = session.post(f"{server.url}/v1/completions",
                                    json={"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
        assert response.status_code == 200, response.text
        answered[int(response.headers["X-Worker-Pid"])] = response.headers["X-Engine-Core"]
    assert answered == {pid: str(core) for pid in server.ready}
    assert engine_cores(server) == [core]
    assert not took_deprecated_vllm_prompts(server)


@pytest.mark.timeout(LOAD_S + 120)
def test_kill_9_of_a_front_end_leaves_the_other_streaming_and_its_replacement_attaches(server):
    (core,) = engine_cores(server)
    survivor, victim = sorted(server.ready)
    survivor_stream = Stream(session_to(server, survivor), server.url, max_tokens=160)
    victim_streams = [Stream(session_to(server, victim), server.url, max_tokens=4000) for _ in range(2)]
    for stream in (survivor_stream, *victim_streams):
        stream.start()
    wait_until(lambda: survivor_stream.chunks and all(s.chunks for s in victim_streams), 120, "all three stream")
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    abort_line = wait_until(lambda: re.search(r"worker (\d+): aborted (\d+) requests", server.log()), 120,
                            "a live front end aborts what the dead one left running")
    aborted_s = time.monotonic() - killed_at
    replacement = wait_until(lambda: next(iter(server.worker_pids() - set(server.ready)), None), 60, "a new worker")
    survivor_stream.join(300)
    for stream in victim_streams:
        stream.join(30)
    server.ready = ready_answers(server)
    attached_s = time.monotonic() - killed_at
    print(f"\nkill -9 of front end {victim}: survivor's stream {len(survivor_stream.chunks)} chunks "
          f"({sum(t > killed_at for t in survivor_stream.chunks)} after the kill); '{abort_line.group(0)}' "
          f"{aborted_s:.1f} s after the kill; replacement {replacement} ready {attached_s:.1f} s after the kill")
    assert survivor_stream.finished and survivor_stream.error is None
    assert sum(t > killed_at for t in survivor_stream.chunks) > 0
    assert all(stream.error for stream in victim_streams)  # their connection died with their worker
    assert int(abort_line.group(2)) == len(victim_streams)
    assert server.ready[replacement]["engine_core_pid"] == core and server.ready[replacement]["client_index"] == 2
    assert engine_cores(server) == [core]  # the same core: nothing was loaded again
    assert "model failed to load" not in server.log()


@pytest.mark.timeout(LOAD_S + 180)
def test_hup_under_load_replaces_the_front_ends_which_attach_to_the_same_core(server):
    (core,) = engine_cores(server)
    old = set(server.ready)
    cores_loaded = len(CORE_READY.findall(server.log()))
    # The client waits as long as a new front end takes to import vLLM: between the old front ends' drain and the
    # new ones' attaching, requests wait in the new workers for their engine.
    with Load(server.url, clients=4, route="/v1/completions", max_tokens=16, timeout_s=LOAD_S,
              max_s=2 * LOAD_S) as load:
        wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 4, 120, "the load is being answered")
        hup_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGHUP)
        wait_until(lambda: not (old & server.worker_pids()), 120, "the old front ends drain and exit")
        server.ready = ready_answers(server)
        ready_at = time.monotonic()
        wait_until(lambda: {o.worker for o in load.snapshot() if o.ok and o.ended > ready_at} >= set(server.ready),
                   120, "both new front ends answered the load")
        outcomes = load.stop()
    counts = summary(outcomes)
    print(f"\nHUP: {counts}; new front ends {sorted(server.ready)} ready {ready_at - hup_at:.0f} s after it, client "
          f"indices {sorted(a['client_index'] for a in server.ready.values())}")
    assert not set(server.ready) & old
    assert [o for o in outcomes if not o.ok] == [], counts
    assert sum(o.started > hup_at for o in outcomes) > 0, "no request was sent while the front ends were replaced"
    assert {a["engine_core_pid"] for a in server.ready.values()} == {core}
    listed = requests.get(f"{server.url}/workers").json()
    assert {w["pid"]: w["engine_core"] for w in listed["ready"]} == {pid: core for pid in server.ready}
    (described,) = listed["engine_cores"]
    assert described["engine_core_pids"] == [core] and described["ready"] and described["generation"] == 0
    assert {a["engine_supervisor_pid"] for a in server.ready.values()} == {described["supervisor_pid"]}
    assert alive(described["supervisor_pid"]) and described["supervisor_pid"] in descendants(server.process.pid)
    assert engine_cores(server) == [core] and len(CORE_READY.findall(server.log())) == cores_loaded  # no model load


@pytest.mark.timeout(2 * LOAD_S)
def test_kill_9_of_the_engine_core_makes_its_workers_unready_and_the_slice_recovers(server):
    (core,) = engine_cores(server)
    old_workers = set(server.ready)
    os.kill(core, signal.SIGKILL)
    killed_at = time.monotonic()
    seen = []
    while time.monotonic() < killed_at + 10:
        try:
            response = requests.get(f"{server.url}/ready", timeout=5)
            seen.append((time.monotonic() - killed_at, response.status_code, response.json().get("engine_core_pid")))
        except requests.RequestException:
            pass
        time.sleep(0.1)
    wait_until(lambda: not (old_workers & server.worker_pids()), 60, "the old core's workers are replaced")
    server.ready = ready_answers(server)
    (new_core,) = engine_cores(server)
    recovered_s = time.monotonic() - killed_at
    print(f"\nkill -9 of engine core {core}: new core {new_core}, workers {sorted(server.ready)} ready after "
          f"{recovered_s:.0f} s; /ready in the first 10 s: {sorted({(round(t), s) for t, s, _ in seen})}")
    assert new_core != core and not alive(core)
    assert not [s for t, s, pid in seen if t > 2 and s == 200 and pid == core], seen
    assert {a["engine_core_pid"] for a in server.ready.values()} == {new_core}
    assert server.infer(["The capital of France is"], temperature=0, max_tokens=4)


@pytest.mark.timeout(240)
def test_sigterm_lets_a_stream_finish_then_leaves_no_process(server):
    tree = descendants(server.process.pid) | {server.process.pid}
    stream = Stream(session_to(server, min(server.ready)), server.url, max_tokens=60)
    stream.start()
    wait_until(lambda: stream.chunks, 60, "the stream starts")
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=180) == 0
    stream.join(30)
    wait_until(lambda: not [pid for pid in tree if alive(pid)], 30, "every process of the server ends")
    assert stream.finished and stream.error is None


@pytest.mark.timeout(3 * LOAD_S)
def test_claimed_indices_relaunch_the_core_then_kill_9_of_the_master_leaves_nothing(start_server):
    server = start_server(*ARGS, env={**ENV, "CLIENT_INDICES_PER_FRONTEND": "1"})
    first = ready_answers(server)
    (core,) = engine_cores(server)
    engine_dir = engine_directory(server)
    tree = set()
    try:
        # Both indices of the core are claimed: the victim's replacement finds none, and the slice moves to a new core.
        os.kill(min(first), signal.SIGKILL)
        wait_until(lambda: "every client index of slice 0's engine core" in server.log(), 120,
                   "the replacement says every client index is claimed")
        wait_until(lambda: not (set(first) & server.worker_pids()), LOAD_S, "the old core's front ends are replaced")
        now = ready_answers(server)
        (new_core,) = engine_cores(server)
        print(f"\nevery index claimed: core {core} -> {new_core}; front ends {sorted(first)} -> {sorted(now)}")
        assert new_core != core and not alive(core)
        assert {a["engine_core_pid"] for a in now.values()} == {new_core}
        assert {a["core_generation"] for a in now.values()} == {1}
        assert sorted(a["client_index"] for a in now.values()) == [0, 1]
        assert server.infer(["The capital of France is"], temperature=0, max_tokens=4)

        tree = descendants(server.process.pid)
        killed_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGKILL)
        wait_until(lambda: not [pid for pid in tree if alive(pid)], 60, "the workers, supervisor and core end")
        print(f"kill -9 of the master: {sorted(tree)} gone after {time.monotonic() - killed_at:.1f} s")
        assert not os.path.exists(engine_dir), "the supervisor left the engine directory behind"
    finally:
        for pid in tree | descendants(server.process.pid):  # never leave a process of this test behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
