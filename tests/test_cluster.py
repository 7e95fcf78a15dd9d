"""`python -m cluster` for real: a local Slurm cluster (tests/local_slurm.py), real nginx, two real servers.

Two Slurm nodes (n1, n2: loopback addresses of this host, one GPU gres each) run one server each
(start_gunicorn.sh, transformers engine, 1 CPU worker), submitted with sbatch by `python -m cluster up`, with nginx
in front. In order:

- bad input (no sbatch, no nginx, empty or unknown nodes, a taken port, a launcher option the cluster sets): one
  line, exit status 2, nothing started (no job, no nginx, no state);
- requests through nginx are answered by both servers, the same greedy text from either; a stream through nginx
  arrives as it is generated; each job asked for its node's GPU;
- under load, one server is killed (SIGKILL, master and worker): requests that start after the kill are all
  answered (by the other server), the watcher resubmits the dead one, and it serves through nginx again;
- nginx killed: the watcher starts it again;
- under steady load, the watcher recycles both servers (lifetime of seconds): drained out of nginx, scancel'ed,
  replaced, one at a time, and no request fails;
- `down` ends every job and nginx and forgets the cluster;
- then one server on the two nodes of a reservation, with a 2-minute job time limit: ahead of the limit the watcher
  starts the replacement on the free node, and the old server drains only once it serves (no capacity lost).

Every wait is bounded; the figures (time to rejoin, requests and failures during the recycles) are printed.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import requests

from benchkit.fault_load import Load, summary
from local_slurm import LocalSlurm, free_port

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
NODES = ["n1", "n2"]
LAUNCHER_OPTIONS = ["--cpu-workers", "1"]
PROMPT = "The capital of France is"
START_TIMEOUT_S = 240  # two servers importing torch on two shared cores
WATCH_OPTIONS = ["--interval", "1", "--failures", "3", "--drain-grace", "2"]


def cluster_command(slurm: LocalSlurm, state_dir: Path, command: str, *args: str, env: dict | None = None,
                    timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", command, "--state-dir", str(state_dir), *args],
                          cwd=ROOT, env=env or slurm.env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


class Cluster:
    """What the tests look at: the state directory `up` filled, nginx's URL, the events the commands recorded."""

    def __init__(self, slurm: LocalSlurm, state_dir: Path, listen: str, port: int):
        self.slurm = slurm
        self.state_dir = state_dir
        self.url = f"http://{listen}"
        self.upstream = {node: f"{slurm.addresses[node]}:{port}" for node in NODES}

    def state(self) -> dict:
        return json.loads((self.state_dir / "cluster.json").read_text())

    def serving_job(self, node: str) -> str:
        return next(s["job_id"] for s in self.state()["servers"] if s["node"] == node and s["phase"] == "serving")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.state_dir / "events.jsonl").read_text().splitlines()]

    def wait_for_event(self, matches, timeout_s: float, after: int = 0) -> tuple[int, dict]:
        """The first event (index, event) after index `after` for which `matches(event)` holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index, event in enumerate(self.events()[after:], start=after):
                if matches(event):
                    return index, event
            if time.monotonic() > deadline:
                recent = "\n".join(map(json.dumps, self.events()[-15:]))
                raise AssertionError(f"no such event within {timeout_s:.0f} s; the last ones:\n{recent}")
            time.sleep(0.2)

    def nginx_pid(self) -> int | None:
        pid_file = self.state_dir / "nginx" / "nginx.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None


def kill_job_processes(job_id: str) -> list[int]:
    """SIGKILL every process of a job's batch step (gunicorn's master and workers), as a node crash would."""
    step = next(p for p in psutil.process_iter(["cmdline"])
                if " ".join(p.info["cmdline"] or []) == f"slurmstepd: [{job_id}.batch]")
    processes = step.children(recursive=True)
    for process in processes:
        process.kill()
    return [process.pid for process in processes]


def infer(url: str, max_tokens: int = 8) -> requests.Response:
    return requests.post(f"{url}/infer", timeout=120,
                         json={"instances": [PROMPT], "params": {"temperature": 0, "max_tokens": max_tokens}})


def wait_for_successes(load: Load, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(o.ok for o in load.snapshot()) < count:
        assert time.monotonic() < deadline, f"the load got no answers: {summary(load.snapshot())}"
        time.sleep(0.2)


@contextmanager
def watching(cluster: Cluster, *options: str):
    """`python -m cluster watch` in the background, stopped with SIGTERM (as `down` would) at the end."""
    log = (cluster.state_dir / "watch.out").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "cluster", "watch", "--state-dir", str(cluster.state_dir),
                                *WATCH_OPTIONS, *options], cwd=ROOT, env=cluster.slurm.env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cluster.wait_for_event(lambda e: e["event"] == "watching" and e["pid"] == process.pid, 30)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(60) == 0, (cluster.state_dir / "watch.out").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one Slurm cluster and one `up` per module


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm(nodes=len(NODES)).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster(slurm, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    listen, port = f"127.0.0.1:{free_port()}", free_port()
    started = time.monotonic()
    up = cluster_command(slurm, state_dir, "up", "--nodes", "n[1-2]", "--bind", "node", "--port", str(port),
                         "--listen", listen, "--interval", "1", "--start-timeout", str(START_TIMEOUT_S),
                         "--", *LAUNCHER_OPTIONS, timeout_s=START_TIMEOUT_S + 60)
    logs = "\n".join(f"== {path.name}\n{path.read_text()[-2000:]}" for path in (state_dir / "logs").glob("*.log"))
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n{logs}"
    print(f"\nup: two servers serving behind nginx after {time.monotonic() - started:.1f} s")
    yield Cluster(slurm, state_dir, listen, port)
    cluster_command(slurm, state_dir, "down", timeout_s=180)  # after a failed test; `down` twice is harmless


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def command_folders(tmp_path_factory):
    """PATH folders: one with Slurm's commands but no nginx, and one with neither."""
    slurm_only, empty = tmp_path_factory.mktemp("slurm-only-bin"), tmp_path_factory.mktemp("empty-bin")
    for command in ("sbatch", "squeue", "scancel", "scontrol"):
        (slurm_only / command).symlink_to(subprocess.check_output(["which", command], text=True).strip())
    return {"no sbatch": str(empty), "no nginx": str(slurm_only)}


BAD_INPUTS = {
    "no sbatch": ([], "sbatch is not on PATH"),
    "no nginx": ([], "nginx is not on PATH"),
    "empty node list": (["--nodes", ""], "--nodes is empty"),
    "unknown node": (["--nodes", "n1,n9"], "not a Slurm node: n9"),
    "nodes listed twice": (["--nodes", "n1,n1"], "listed twice: n1"),
    "port clash": ([], "nginx cannot listen on"),
    "launcher port": (["--", "--port", "6000"], "launcher option --port is set by the cluster command"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_starts_nothing(slurm, command_folders, tmp_path, case):
    args, message = BAD_INPUTS[case]
    env = {**slurm.env, "PATH": command_folders[case]} if case in command_folders else slurm.env
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1] if case == 'port clash' else free_port()}"
        if not any(arg == "--nodes" for arg in args):
            args = ["--nodes", "n[1-2]", *args]
        jobs_before = slurm.jobs()
        launcher_at = args.index("--") if "--" in args else len(args)
        done = cluster_command(slurm, tmp_path, "up", *args[:launcher_at], "--listen", listen, "--bind", "node",
                               *args[launcher_at:], env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert slurm.jobs() == jobs_before, "a job was submitted"
    assert not (tmp_path / "cluster.json").exists() and not (tmp_path / "nginx" / "nginx.pid").exists()


# ---------------------------------------------------------------------------------------------------------------
# Serving


def test_requests_through_nginx_reach_both_servers(cluster):
    answers, upstreams = [], Counter()
    for _ in range(6):
        response = infer(cluster.url)
        assert response.status_code == 200, response.text
        answers.append(response.json())
        upstreams[response.headers["X-Upstream-Addr"]] += 1
    assert set(upstreams) == set(cluster.upstream.values()), upstreams
    assert all(answer == answers[0] for answer in answers), answers  # greedy: the same text from either server
    for node in NODES:  # Slurm gave every job its node's GPU (a /dev/null stand-in here)
        job = cluster.slurm.run("scontrol", "show", "job", cluster.serving_job(node))
        assert f"NodeList={node}" in job and "gres:gpu:1" in job, job
    status = cluster_command(cluster.slurm, cluster.state_dir, "status")
    assert status.returncode == 0, status.stderr
    for node in NODES:
        line = next(line for line in status.stdout.splitlines() if line.startswith(f"{node} "))
        assert line.split()[3:] == ["RUNNING", "serving", "ready"], status.stdout


def test_a_stream_through_nginx_is_not_buffered(cluster):
    started = time.monotonic()
    arrivals = []
    with requests.post(f"{cluster.url}/infer", stream=True, timeout=120, json={
            "instances": [PROMPT], "stream": True,
            "params": {"temperature": 0, "max_tokens": 24, "ignore_eos": True}}) as response:
        assert response.status_code == 200, response.text
        for chunk in response.iter_content(chunk_size=None):
            arrivals.append((time.monotonic() - started, chunk))
    end = time.monotonic() - started
    lines = [json.loads(line) for line in b"".join(chunk for _, chunk in arrivals).splitlines()]
    assert lines[-1]["finish_reason"] is not None and len(lines) > 10
    # Buffered, everything would arrive at the end; the first text arriving early is the evidence.
    assert arrivals[0][0] < 0.5 * end, f"first text after {arrivals[0][0]:.2f} s of {end:.2f} s: buffered"


# ---------------------------------------------------------------------------------------------------------------
# Failure: kill one server


def test_a_killed_server_is_routed_around_resubmitted_and_rejoins(cluster):
    dead_job = cluster.serving_job("n1")
    with watching(cluster) as watcher, Load(cluster.url, clients=2, max_tokens=8, timeout_s=60, max_s=300) as load:
        wait_for_successes(load, 2)
        mark = len(cluster.events())
        killed_at, killed_at_wall = time.monotonic(), time.time()
        kill_job_processes(dead_job)
        # Whichever the watcher sees first: Slurm listing the job as ended, or --failures failed checks (scancel).
        _, noticed = cluster.wait_for_event(lambda e: e["event"] in ("failed", "stopping") and e["job"] == dead_job,
                                            30, after=mark)
        _, submitted = cluster.wait_for_event(lambda e: e["event"] == "submitted" and e["node"] == "n1", 30,
                                              after=mark)
        cluster.wait_for_event(lambda e: e["event"] == "serving" and e["job"] == submitted["job"],
                               START_TIMEOUT_S, after=mark)
        rejoined_s = time.monotonic() - killed_at
        deadline = time.monotonic() + 60
        while infer(cluster.url).headers.get("X-Upstream-Addr") != cluster.upstream["n1"]:
            assert time.monotonic() < deadline, "the new server on n1 got no request through nginx"
        outcomes = load.stop()
    assert watcher.returncode == 0
    assert cluster.serving_job("n1") == submitted["job"] != dead_job
    after_kill = [o for o in outcomes if o.started > killed_at]
    at_kill = [o for o in outcomes if o.started <= killed_at < o.ended]
    how = noticed.get("why") or f"its job {noticed['job_state']}"
    # Requests nginx passed on from the dead server to the other (the access log lists both upstreams).
    passed_on = (cluster.state_dir / "nginx" / "access.log").read_text().count(f"upstream={cluster.upstream['n1']}, ")
    print(f"\nkill -9 of n1's server: noticed ({how}) after {noticed['time'] - killed_at_wall:.1f} s, resubmitted, "
          f"serving through nginx again after {rejoined_s:.1f} s; "
          f"{len(after_kill)} requests started after the kill: {summary(after_kill)}; "
          f"{len(at_kill)} in flight at the kill: {summary(at_kill)}; {passed_on} passed on by nginx to n2")
    assert after_kill and all(o.ok for o in after_kill), summary(after_kill)


def test_a_dead_nginx_is_started_again(cluster):
    master = psutil.Process(cluster.nginx_pid())
    with watching(cluster):
        mark = len(cluster.events())
        for process in [master, *master.children()]:
            process.kill()
        cluster.wait_for_event(lambda e: e["event"] == "nginx_restart", 30, after=mark)
        response = infer(cluster.url)
    assert response.status_code == 200, response.text
    assert cluster.nginx_pid() != master.pid


# ---------------------------------------------------------------------------------------------------------------
# Planned recycle under load


def test_a_planned_recycle_under_load_loses_no_request(cluster):
    old_jobs = {node: cluster.serving_job(node) for node in NODES}
    mark = len(cluster.events())
    # The load stops before the watcher (which may have begun another recycle by then).
    with watching(cluster, "--lifetime", "2", "--jitter", "2"), \
            Load(cluster.url, clients=3, max_tokens=8, timeout_s=60, max_s=400) as load:
        started = time.monotonic()
        replaced = {}
        for _ in NODES:  # both servers, one after the other, whichever is due first
            _, serving = cluster.wait_for_event(
                lambda e: e["event"] == "serving" and e["node"] not in replaced, START_TIMEOUT_S + 60, after=mark)
            replaced[serving["node"]] = serving["job"]
        took_s = time.monotonic() - started
        outcomes = load.stop()
    events = cluster.events()[mark:]
    print(f"\nplanned recycle of both servers under load (3 clients) in {took_s:.1f} s: {len(outcomes)} requests, "
          f"{summary(outcomes)}")
    assert len(outcomes) >= 10 and all(o.ok for o in outcomes), summary(outcomes)

    def index(event: str, **fields) -> int:
        return next(i for i, e in enumerate(events) if e["event"] == event and fields.items() <= e.items())

    for node, old_job in old_jobs.items():
        new_job = replaced[node]
        upstream = cluster.upstream[node]
        drained = index("draining", job=old_job)
        out_of_nginx = next(i for i, e in enumerate(events) if i > drained and e["event"] == "nginx"
                            and upstream not in e["upstreams"])
        stopping = index("stopping", job=old_job)
        assert events[stopping]["why"] == "drained"
        ended, submitted, serving = index("ended", job=old_job), index("submitted", job=new_job), index(
            "serving", job=new_job)
        back_in_nginx = next(i for i, e in enumerate(events) if i > serving and e["event"] == "nginx"
                             and upstream in e["upstreams"])
        # Out of nginx before scancel; the replacement only once the old job has left the node (its GPUs).
        assert drained < out_of_nginx < stopping < ended < submitted < serving < back_in_nginx, events
        drain_s = events[ended]["time"] - events[drained]["time"]
        restart_s = events[serving]["time"] - events[submitted]["time"]
        print(f"  {node}: job {old_job} drained and ended in {drain_s:.1f} s; job {new_job} serving "
              f"{restart_s:.1f} s after it was submitted")
    # One at a time: the second recycle began only once the first replacement served; nginx never went empty.
    first, second = sorted(NODES, key=lambda node: index("serving", job=replaced[node]))
    assert index("serving", job=replaced[first]) < index("draining", job=old_jobs[second])
    assert all(e["upstreams"] for e in events if e["event"] == "nginx")


# ---------------------------------------------------------------------------------------------------------------
# Down


def test_down_ends_every_job_and_nginx(cluster):
    nginx_pid = cluster.nginx_pid()
    assert nginx_pid is not None and psutil.pid_exists(nginx_pid)
    assert cluster.slurm.live_jobs()
    done = cluster_command(cluster.slurm, cluster.state_dir, "down", timeout_s=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not cluster.slurm.live_jobs()
    assert not psutil.pid_exists(nginx_pid)
    jobs = {e["job"] for e in cluster.events() if e["event"] == "submitted"}
    steps = {" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])}
    assert not {f"slurmstepd: [{job}.batch]" for job in jobs} & steps, "a job's processes outlived `down`"
    for upstream in cluster.upstream.values():
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{upstream}/health", timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{cluster.url}/health", timeout=5)
    status = cluster_command(cluster.slurm, cluster.state_dir, "status")
    assert status.returncode == 2 and "no cluster is up" in status.stderr


# ---------------------------------------------------------------------------------------------------------------
# A free node: recycling without losing capacity


def test_with_a_free_node_a_recycle_starts_the_replacement_before_draining(slurm, tmp_path):
    """One server on the two nodes of a reservation, jobs with a 2-minute time limit: well before the limit the
    watcher starts a replacement on the free node, and the old server drains only once that one serves. `down` also
    stops the watcher."""
    slurm.run("scontrol", "create", "reservation", "reservationname=serving", "users=root", "nodes=n[1-2]",
              "starttime=now", "duration=30", "flags=ignore_jobs")
    listen, port = f"127.0.0.1:{free_port()}", free_port()
    up = cluster_command(slurm, tmp_path, "up", "--reservation", "serving", "--servers", "1", "--time", "2",
                         "--bind", "node", "--port", str(port), "--listen", listen, "--interval", "1",
                         "--start-timeout", str(START_TIMEOUT_S), "--", *LAUNCHER_OPTIONS,
                         timeout_s=START_TIMEOUT_S + 60)
    assert up.returncode == 0, up.stdout + up.stderr
    cluster = Cluster(slurm, tmp_path, listen, port)
    try:
        (old,) = cluster.state()["servers"]
        assert "Reservation=serving" in slurm.run("scontrol", "show", "job", old["job_id"])
        free_node = next(node for node in NODES if node != old["node"])
        mark = len(cluster.events())
        # Due halfway to the time limit (120 s): the limit less the drain timeout (100 s) would be earlier. The load
        # starts with the recycle, which it is there to watch.
        with watching(cluster, "--drain-timeout", "100") as watcher:
            cluster.wait_for_event(lambda e: e["event"] == "recycling", 90, after=mark)
            with Load(cluster.url, clients=2, max_tokens=8, timeout_s=60, max_s=300) as load:
                cluster.wait_for_event(lambda e: e["event"] == "ended" and e["job"] == old["job_id"],
                                       START_TIMEOUT_S, after=mark)
                outcomes = load.stop()
            down = cluster_command(slurm, tmp_path, "down", timeout_s=180)
            assert down.returncode == 0, down.stdout + down.stderr
            assert watcher.poll() is not None, "`down` left the watcher running"
    finally:
        cluster_command(slurm, tmp_path, "down", timeout_s=180)
    events = cluster.events()[mark:]
    print(f"\nrecycle onto a free node before the time limit, under load (2 clients): {len(outcomes)} requests, "
          f"{summary(outcomes)}")
    assert outcomes and all(o.ok for o in outcomes), summary(outcomes)

    def index(event: str, **fields) -> int:
        return next(i for i, e in enumerate(events) if e["event"] == event and fields.items() <= e.items())

    recycling = index("recycling", job=old["job_id"], why="time limit", replacement_on=free_node)
    submitted = index("submitted", replaces=old["job_id"], node=free_node)
    new_job = events[submitted]["job"]
    assert recycling < submitted < index("serving", job=new_job) < index("draining", job=old["job_id"]), events
    # Capacity never dropped: one reload switched nginx from the old server to the new one, already serving.
    nginx_sets = [e["upstreams"] for e in events if e["event"] == "nginx"]
    assert all(nginx_sets) and nginx_sets[0] == [cluster.upstream[free_node]], nginx_sets
    assert not slurm.live_jobs()
