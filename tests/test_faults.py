"""Faults and life cycle with real processes, under load, each bounded in time.

A real gunicorn server (start_gunicorn.sh, transformers engine, 2 CPU workers, --timeout 20 so drains are short) is
hit by N client threads (benchkit/fault_load.py) while its processes are killed or signalled:

- kill -9 of a worker, round after round (5, or at least 3 when a slow machine makes them long): clients get an
  answer or an error, never a hang; the replacement takes the freed slice; the dispatcher's state file never names a
  device twice nor a dead holder;
- HUP (reload): no request fails, every worker is replaced, and no two workers ever hold one slice at once (the
  state file is sampled every 50 ms through the reload);
- SIGTERM: requests in flight finish with 200, new connections are refused, the master exits 0, nothing is left
  (no process, and no metrics folder although the server was reloaded before);
- kill -9 of the master: the workers notice and exit, within a bound;
- an engine that dies (FAULT_INJECT_AFTER_STEPS): the request gets an error, /ready says why, and gunicorn
  replaces the worker on the same slice.

A client that times out (60 s) counts as a hang and fails the test. Measured counts are printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from benchkit.fault_load import Load, longest_gap, summary

TIMEOUT_S = 20  # --timeout: the graceful drain, and how long a request waits for a loading model
KILL_ROUNDS = 5
MIN_KILL_ROUNDS = 3
# A replacement imports torch and loads the model: seconds on an idle machine, up to a minute on a busy one. The
# rounds stop after this many seconds once MIN_KILL_ROUNDS are done, to keep the module within a few minutes.
KILL_BUDGET_S = 120
SLICES = ["cpu0", "cpu1"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(interval_s)


def read_state(server) -> list[dict]:
    """The dispatcher's holdings (the host-wide slice file the fixture put under the server's tmp dir)."""
    return json.loads(Path(server.env["DISPATCHER_STATE"]).read_text())["holdings"]


def duplicated_keys(holdings: list[dict]) -> list[str]:
    keys = [key for holding in holdings for key in holding["devices"]]
    return sorted({key for key in keys if keys.count(key) > 1})


def check_state(server, ready: dict[int, str]) -> None:
    """The state file names exactly the ready workers, each alive, on the slice it reports, no device twice."""
    holdings = read_state(server)
    assert duplicated_keys(holdings) == [], holdings
    assert sorted(h["pid"] for h in holdings) == sorted(ready), (holdings, ready)
    for holding in holdings:
        assert alive(holding["pid"]), f"state file names dead holder {holding['pid']}: {holdings}"
        # CPU device keys end in the slice number: cpu:<server>:<n> is the slice labelled cpu<n>.
        assert [f"cpu{key.rsplit(':', 1)[1]}" for key in holding["devices"]] == [ready[holding["pid"]]], holding


def metrics_dir(server) -> Path | None:
    """The server's Prometheus multiprocess folder (gunicorn_conf.py makes a fresh one), from a worker's mappings."""
    for pid in server.worker_pids():
        try:
            for mapping in psutil.Process(pid).memory_maps():
                if "gunicorn-llm-metrics-" in mapping.path and mapping.path.endswith(".db"):
                    return Path(mapping.path).parent
        except psutil.Error:
            pass
    return None


def wait_for_replacement(server, gone: set[int], workers: int, timeout_s: float = 150) -> dict[int, str]:
    """Wait until none of `gone` is a worker any more and `workers` new-or-old workers answer /ready 200."""
    wait_until(lambda: not (server.worker_pids() & gone) and len(server.worker_pids()) == workers, timeout_s,
               f"gunicorn replaced {sorted(gone)} ({server.worker_pids()})", interval_s=0.2)
    return server.wait_until_ready(workers=workers, timeout_s=timeout_s)


def both_workers_answer(server, pids: set[int], timeout_s: float = 60) -> dict[int, list]:
    """Generation requests until every pid in `pids` answered one with 200."""
    answers: dict[int, list] = {}
    deadline = time.monotonic() + timeout_s
    while set(answers) != pids:
        assert time.monotonic() < deadline, f"only {sorted(answers)} of {sorted(pids)} answered"
        response = requests.post(f"{server.url}/infer", json={"instances": ["Hi"], "params": {"max_tokens": 2}},
                                 timeout=60)
        assert response.status_code == 200, response.text
        answers[int(response.headers["X-Worker-Pid"])] = response.json()
    return answers


def acceptable_under_kill(outcome) -> bool:
    """While workers are killed a client may get an answer, a 5xx, or a broken connection; not a hang or a 4xx."""
    if outcome.status is not None:
        return outcome.status == 200 or outcome.status >= 500
    return outcome.error in ("ConnectionError", "ChunkedEncodingError")


# ---------------------------------------------------------------------------------------------------------------
# A 2-worker server shared by the kill -9, HUP and SIGTERM tests (in this order: SIGTERM ends it)


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server("--cpu-workers", "2", "--timeout", str(TIMEOUT_S))
    server.slices = server.wait_until_ready(workers=2)
    return server


@pytest.mark.timeout(300)
def test_kill_9_of_a_worker_under_load_many_times(server):
    ready = server.wait_until_ready(workers=2)
    assert sorted(ready.values()) == SLICES
    check_state(server, ready)
    rounds = []
    began = time.monotonic()
    with Load(server.url, clients=6, max_tokens=8, max_s=280) as load:
        for round_ in range(KILL_ROUNDS):
            if round_ >= MIN_KILL_ROUNDS and time.monotonic() - began > KILL_BUDGET_S:
                break
            victim = next(pid for pid, slice_ in ready.items() if slice_ == SLICES[round_ % 2])  # alternate slices
            (survivor,) = set(ready) - {victim}
            # Mid-request: wait until the victim is answering this load, then kill it while requests run.
            since = time.monotonic()
            wait_until(lambda victim=victim, since=since: any(o.worker == victim and o.ended > since
                                                              for o in load.snapshot()),
                       60, f"worker {victim} answered a request of round {round_}")
            time.sleep(0.3)
            in_flight = len(load.in_flight())
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            now = wait_for_replacement(server, {victim}, workers=2)
            recovered_at = time.monotonic()
            (replacement,) = set(now) - {survivor}
            assert replacement != victim
            assert now[survivor] == ready[survivor], "the surviving worker changed slice"
            assert now[replacement] == ready[victim], "the replacement did not take the freed slice"
            assert sorted(now.values()) == SLICES
            check_state(server, now)
            rounds.append({"victim": victim, "in_flight": in_flight, "killed_at": killed_at,
                           "recovered_at": recovered_at, "recovery_s": round(recovered_at - killed_at, 1)})
            ready = now
        outcomes = load.stop()
    both_workers_answer(server, set(ready))
    server.slices = ready

    counts = summary(outcomes)
    failed = [o for o in outcomes if not o.ok]
    print(f"\nkill -9 x{len(rounds)}: {counts}; (in flight, recovery s) per round: "
          f"{[(r['in_flight'], r['recovery_s']) for r in rounds]}")
    assert not [o for o in outcomes if o.hung], f"client timeouts (hangs): {counts}"
    assert all(acceptable_under_kill(o) for o in outcomes), counts
    assert all(r["in_flight"] > 0 for r in rounds), "a kill found no request in flight"
    assert failed, "no request was cut by the kills of a busy worker: the kills did not land mid-request"
    # Every request that started after a recovery and ended before the next kill was answered.
    for after, before in zip(rounds, [*rounds[1:], {"killed_at": float("inf")}], strict=True):
        calm = [o for o in outcomes if o.started > after["recovered_at"] and o.ended < before["killed_at"]]
        assert all(o.ok for o in calm), summary(calm)
    assert counts.get("200", 0) >= 2 * len(rounds)


@pytest.mark.timeout(240)
def test_hup_under_load_replaces_every_worker_without_a_failed_request(server):
    before = server.wait_until_ready(workers=2)
    old = set(before)
    samples: list[tuple[float, list[dict] | str]] = []
    sampling = threading.Event()

    def sample_state():
        while not sampling.is_set():
            try:
                samples.append((time.monotonic(), read_state(server)))
            except (OSError, ValueError, KeyError) as error:
                samples.append((time.monotonic(), repr(error)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_state, name="state-sampler", daemon=True)
    sampler.start()
    try:
        with Load(server.url, clients=6, max_tokens=8, max_s=200) as load:
            wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 6, 60, "the load is being answered")
            time.sleep(2)
            hup_at = time.monotonic()
            os.kill(server.process.pid, signal.SIGHUP)
            new = wait_for_replacement(server, old, workers=2)
            ready_at = time.monotonic()
            # Keep the load on until both new workers have answered some of it, and a few seconds more.
            wait_until(lambda: {o.worker for o in load.snapshot() if o.ok and o.ended > ready_at} >= set(new), 60,
                       "both new workers answered the load")
            time.sleep(3)
            outcomes = load.stop()
        end = time.monotonic()
    finally:
        sampling.set()
        sampler.join(timeout=5)

    counts = summary(outcomes)
    failed = [o for o in outcomes if not o.ok]
    gap = longest_gap(outcomes, hup_at, end)
    print(f"\nHUP: {counts}; failed {len(failed)} {summary(failed)}; new workers ready after "
          f"{ready_at - hup_at:.1f} s; longest time without a completed request {gap:.1f} s; "
          f"{len(samples)} state samples over {end - hup_at:.1f} s")

    assert not set(new) & old, f"not every worker was replaced: {old} -> {set(new)}"
    assert sorted(new.values()) == SLICES
    check_state(server, new)
    unreadable = [s for _, s in samples if isinstance(s, str)]
    assert unreadable == [], unreadable[:3]
    # Sampled every 50 ms from before the HUP to after it: a slice held twice at any moment shows up here.
    doubled = [(round(t - hup_at, 2), s) for t, s in samples if not isinstance(s, str) and duplicated_keys(s)]
    assert doubled == [], doubled[:3]
    assert len(samples) >= (end - hup_at) / 0.05 / 4, "the state file was not sampled often enough"
    holders_seen = {h["pid"] for _, s in samples if not isinstance(s, str) for h in s}
    assert holders_seen >= old | set(new), "the samples did not cover the handover"
    assert counts.get("200", 0) > 0
    assert not [o for o in outcomes if o.hung], f"client timeouts (hangs): {counts}"
    assert failed == [], f"{len(failed)} requests failed during the reload: {summary(failed)}"
    server.slices = new


@pytest.mark.timeout(180)
def test_sigterm_under_load_drains_in_flight_requests_and_leaves_nothing(server):
    server.wait_until_ready(workers=2)
    master = server.process.pid
    tree = descendants(master) | {master}
    with Load(server.url, clients=6, max_tokens=16, max_s=120) as load:
        wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 4, 60, "the load is being answered")
        server.metrics_dir = metrics_dir(server)  # for the next test

        def settled_requests():
            # In flight: sent at least 0.5 s ago (so accepted by a worker) and not answered yet.
            now = time.monotonic()
            flights = {client: started for client, started in load.in_flight().items() if started < now - 0.5}
            return flights if len(flights) >= 3 else None

        in_flight = wait_until(settled_requests, 60, "3 requests in flight")
        term_at = time.monotonic()
        os.kill(master, signal.SIGTERM)  # the launcher exec'd gunicorn: this pid is the master
        load.stop_sending()  # what ran at the SIGTERM is what must drain

        time.sleep(0.5)  # the drain has started; the master closed its listening socket at once
        probe_at = time.monotonic()
        try:
            probe = requests.post(f"{server.url}/infer", json={"instances": ["Hi"], "params": {"max_tokens": 2}},
                                  timeout=(5, 60))
            probe_result = f"HTTP {probe.status_code}"
        except requests.RequestException as error:
            probe_result = f"{type(error).__name__}: {error}"
        probe_s = time.monotonic() - probe_at

        status = server.process.wait(timeout=TIMEOUT_S + 15)
        exited_s = time.monotonic() - term_at
        outcomes = load.stop()

    drained = [o for o in outcomes if (o.client, o.started) in in_flight.items()]
    print(f"\nSIGTERM: {len(in_flight)} in flight -> {summary(drained)}; master exited {status} after "
          f"{exited_s:.1f} s; new connection during the drain: {probe_result} after {probe_s:.2f} s")
    assert status == 0
    assert exited_s < TIMEOUT_S + 15
    assert len(in_flight) >= 3
    assert len(drained) == len(in_flight)
    assert all(o.ok for o in drained), f"requests in flight at SIGTERM did not finish: {summary(drained)}"
    assert not [o for o in outcomes if o.hung]
    wait_until(lambda: not any(alive(pid) for pid in tree), 15, "every process of the server exited")
    assert not probe_result.startswith("HTTP"), f"a new request was served during the drain: {probe_result}"
    assert "Connection refused" in probe_result and probe_s < 1.0, (
        f"a new connection during the drain was not refused: {probe_result} after {probe_s:.2f} s "
        f"(the drain lasted {exited_s:.1f} s)"
    )


def test_the_metrics_folder_is_removed_at_exit_also_after_a_reload(server):
    """The server above was reloaded (HUP) and then stopped (SIGTERM): its metrics folder must be gone."""
    assert server.process.poll() is not None, "the SIGTERM test did not stop the server"
    assert server.metrics_dir is not None, "no metrics folder was found before the SIGTERM"
    left = server.metrics_dir.exists()
    shutil.rmtree(server.metrics_dir, ignore_errors=True)  # clean up what the server left, then say so
    assert not left, f"{server.metrics_dir} outlived the server (it was reloaded with HUP before it stopped)"


# ---------------------------------------------------------------------------------------------------------------
# kill -9 of the master (its own server)


@pytest.mark.timeout(240)
def test_kill_9_of_the_master_leaves_no_worker(start_server):
    server = start_server("--cpu-workers", "2", "--timeout", str(TIMEOUT_S))
    ready = server.wait_until_ready(workers=2)
    master = server.process.pid
    workers = descendants(master)
    assert set(ready) <= workers
    folder = metrics_dir(server)
    try:
        with Load(server.url, clients=2, max_tokens=8, max_s=120) as load:
            wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 2, 60, "the load is being answered")
            killed_at = time.monotonic()
            os.kill(master, signal.SIGKILL)
            assert server.process.wait(timeout=10) == -signal.SIGKILL
            leftover = None
            deadline = killed_at + 30
            while time.monotonic() < deadline:
                leftover = {pid for pid in workers if alive(pid)}
                if not leftover:
                    break
                time.sleep(0.2)
            gone_s = time.monotonic() - killed_at
            outcomes = load.stop()
        print(f"\nkill -9 master: workers gone after {gone_s:.1f} s; load {summary(outcomes)}")
        assert not leftover, f"workers {sorted(leftover)} outlived their master by 30 s"
        assert not [o for o in outcomes if o.hung], summary(outcomes)
        assert all(acceptable_under_kill(o) for o in outcomes), summary(outcomes)
    finally:
        for pid in workers:  # never leave a worker of this test behind, whatever failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if folder is not None:  # a master killed with -9 cannot remove its metrics folder (on_exit): do it here
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# An engine that dies, injected through configuration (its own 1-worker server)


@pytest.mark.timeout(240)
def test_engine_failure_gets_an_error_answer_and_the_worker_is_replaced_on_its_slice(start_server):
    server = start_server("--cpu-workers", "1", "--timeout", str(TIMEOUT_S), env={"FAULT_INJECT_AFTER_STEPS": "3"})
    ((first, first_slice),) = server.wait_until_ready(workers=1).items()
    assert first_slice == "cpu0"
    with requests.Session() as session:  # one connection: /ready below is asked of the same (dying) worker
        started = time.monotonic()
        failed = session.post(f"{server.url}/infer",
                              json={"instances": ["Once upon a time"], "params": {"max_tokens": 10,
                                                                                   "ignore_eos": True}},
                              timeout=60)
        answered_s = time.monotonic() - started
        assert failed.status_code >= 500, failed.text
        assert int(failed.headers["X-Worker-Pid"]) == first
        assert "fault injected" in failed.json()["error"]["message"]
        try:
            readiness = session.get(f"{server.url}/ready", timeout=30)
            ready_answer = (readiness.status_code, int(readiness.headers["X-Worker-Pid"]), readiness.json())
        except requests.RequestException:
            ready_answer = None  # the worker is already gone (and its replacement not listening yet)
    print(f"\nengine failure: {failed.status_code} after {answered_s:.1f} s; /ready of the dying worker: "
          f"{ready_answer and ready_answer[:2]}")
    if ready_answer is not None and ready_answer[1] == first:
        status, _, body = ready_answer
        assert status == 503, body
        assert "engine failed" in body["error"]["message"] and "fault injected" in body["error"]["message"]

    replaced_at = time.monotonic()
    ((second, second_slice),) = wait_for_replacement(server, {first}, workers=1, timeout_s=120).items()
    print(f"engine failure: replacement {second} ready {time.monotonic() - replaced_at:.1f} s after the failure")
    assert second != first and not alive(first)
    assert second_slice == first_slice
    check_state(server, {second: second_slice})
    # The replacement built a fresh engine (its step count starts again): 2 steps are below the injected 3.
    assert server.infer(["Hi"], max_tokens=2, temperature=0)
    assert "the engine died" in server.log()
    assert server.process.poll() is None, "the server stopped instead of replacing the worker"

    # A stream has sent its 200 already: the replacement's engine dies at its next step (the 3rd), and the stream
    # ends with that error as its last event, in the error shape, before [DONE].
    with requests.post(f"{server.url}/v1/completions", stream=True, timeout=60,
                       json={"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True, "stream": True}
                       ) as streamed:
        assert streamed.status_code == 200
        events = [line.removeprefix("data: ") for line in streamed.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "fault injected" in error["message"], error
