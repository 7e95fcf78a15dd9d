"""Tests for gunicorn_llm/ops/dispatcher.py: slicing, and the host-wide file-locked allocation with real
competing processes.

Worker processes are real Python children (see WORKER_SCRIPT) that share one state file under tmp_path; nothing
about the lock or the processes is mocked. GPU lists come from GPU_IDS-style configured ids, so no GPU is needed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from gunicorn_llm.ops.dispatcher import (
    Device,
    DispatchError,
    GPUDispatcher,
    NoFreeSliceError,
    Slice,
    _nvml_gpus,
    _select_visible,
    cut_slices,
    discover_devices,
    pin_slice,
    pinned_slice_label,
    vllm_compute_cores,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]

# A worker answers one JSON line per command read from stdin, and exits (without releasing) at end of input.
#   acquire [wait_s] -> {"slice": label} or {"error": message}
#   release          -> {"released": true}
WORKER_SCRIPT = r"""
import json, os, sys
from gunicorn_llm.ops.dispatcher import GPUDispatcher, NoFreeSliceError, cut_slices, discover_devices
state_file, gpu_ids, per_slice, holders, server_pid = sys.argv[1:]
dispatcher = GPUDispatcher(cut_slices(discover_devices(gpu_ids, None, 0), int(per_slice)), int(holders), state_file)
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "acquire":
        try:
            wait_s = float(args[0]) if args else 0.0
            reply = {"slice": dispatcher.acquire_slice(os.getpid(), int(server_pid), wait_s).label}
        except NoFreeSliceError as error:
            reply = {"error": str(error)}
    elif command == "release":
        dispatcher.release_slice(os.getpid())
        reply = {"released": True}
    print(json.dumps(reply), flush=True)
"""


class Worker:
    """A real child process driving its own GPUDispatcher over a shared state file."""

    def __init__(self, state_file: Path, server_pid: int, gpu_ids: str, per_slice: int, holders: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, str(state_file), gpu_ids, str(per_slice), str(holders),
             str(server_pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.pid = self.proc.pid

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"worker {self.pid} exited unexpectedly (rc={self.proc.poll()})"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.send(command)
        return self.read()

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "slices.json"


@pytest.fixture
def spawn_workers(state_file: Path):
    """spawn_workers(n, server_pid=..., gpu_ids=..., per_slice=..., holders=...) -> n ready Workers."""
    started: list[Worker] = []

    def spawn(n: int, *, server_pid: int, gpu_ids: str = "0,1,2,3", per_slice: int = 1, holders: int = 1):
        batch = [Worker(state_file, server_pid, gpu_ids, per_slice, holders) for _ in range(n)]
        started.extend(batch)
        for worker in batch:
            assert worker.read() == {"ready": worker.pid}
        return batch

    yield spawn
    for worker in started:
        worker.stop()


@pytest.fixture
def spawn_server():
    """spawn_server() -> pid of a real long-lived process standing in for a gunicorn master."""
    started: list[subprocess.Popen] = []

    def spawn() -> int:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        started.append(proc)
        return proc.pid

    yield spawn
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


def make_dispatcher(state_file: Path, gpu_ids: str = "0,1,2,3", per_slice: int = 1, holders: int = 1):
    return GPUDispatcher(cut_slices(discover_devices(gpu_ids, None, 0), per_slice), holders, str(state_file))


def acquire_all(workers: list[Worker], command: str = "acquire") -> list[dict]:
    """Send the command to every worker before reading any reply, so they all compete for the lock at once."""
    for worker in workers:
        worker.send(command)
    return [worker.read() for worker in workers]


def fake_gpu(index: int, uuid: str) -> Device:
    return Device(key=uuid, label=str(index), pin=str(index))


FAKE_GPUS = [
    fake_gpu(0, "GPU-aaaa1111-0000-0000-0000-000000000000"),
    fake_gpu(1, "GPU-bbbb2222-0000-0000-0000-000000000000"),
    fake_gpu(2, "GPU-cccc3333-0000-0000-0000-000000000000"),
    fake_gpu(3, "GPU-cccc4444-0000-0000-0000-000000000000"),
]


# ---------------------------------------------------------------------------------------------------------------
# Discovery and slicing


@pytest.mark.parametrize(
    ("per_slice", "expected"),
    [
        (1, ["0", "1", "2", "3"]),
        (2, ["0,1", "2,3"]),
        (4, ["0,1,2,3"]),
    ],
)
def test_configured_ids_cut_into_slices(per_slice, expected):
    slices = cut_slices(discover_devices("0, 1,2,3", None, 0), per_slice)
    assert [s.label for s in slices] == expected
    assert [s.index for s in slices] == list(range(len(expected)))
    assert all(not s.is_cpu for s in slices)
    assert slices[0].keys[0] == "configured:0"


def test_per_slice_that_does_not_divide_the_gpus_is_rejected():
    with pytest.raises(DispatchError, match=r"--per_proc_gpus 3 does not divide the 4 visible GPUs \(0,1,2,3\)"):
        cut_slices(discover_devices("0,1,2,3", None, 0), 3)


def test_nonpositive_sizes_are_rejected(state_file):
    with pytest.raises(DispatchError, match="PER_PROC_GPUS must be 1 or more"):
        cut_slices(discover_devices("0,1", None, 0), 0)
    with pytest.raises(DispatchError, match="WORKERS_PER_GPU must be 1 or more"):
        GPUDispatcher(cut_slices(discover_devices("0,1", None, 0), 1), 0, str(state_file))


def test_duplicate_configured_ids_are_rejected():
    with pytest.raises(DispatchError, match="names a GPU twice"):
        discover_devices("0,1,1", None, 0)


def test_without_gpus_there_are_cpu_slices():
    if _nvml_gpus():
        pytest.skip("NVML finds GPUs on this machine")
    devices = discover_devices(None, None, 3)
    slices = cut_slices(devices, 2)  # PER_PROC_GPUS does not group CPU devices
    assert [s.label for s in slices] == ["cpu0", "cpu1", "cpu2"]
    assert [d.pin for d in devices] == ["", "", ""]
    assert all(s.is_cpu for s in slices)
    assert len({d.key for d in devices}) == 3
    assert all(f"cpu:{os.getpid()}@" in d.key for d in devices)  # private to this server


@pytest.mark.parametrize(
    ("visible", "expected_labels"),
    [
        ("2,0", ["2", "0"]),
        ("3, 1", ["3", "1"]),
        ("GPU-bbbb", ["1"]),
        ("cccc4444,aaaa", ["3", "0"]),  # UUID prefix without the GPU- prefix
        ("GPU-cccc3333,1", ["2", "1"]),
    ],
)
def test_select_visible_follows_the_listed_order(visible, expected_labels):
    assert [gpu.label for gpu in _select_visible(FAKE_GPUS, visible)] == expected_labels


@pytest.mark.parametrize(
    ("visible", "message"),
    [
        ("0,7", r"entry '7' matches 0 GPUs \(this host has indices 0-3\)"),
        ("GPU-dddd", r"entry 'GPU-dddd' matches 0 GPUs"),
        ("cccc", r"entry 'cccc' matches 2 GPUs"),  # ambiguous UUID prefix
        ("0,GPU-aaaa", r"names GPU 'GPU-aaaa' twice"),
    ],
)
def test_select_visible_rejects_unknown_ambiguous_or_repeated_entries(visible, message):
    with pytest.raises(DispatchError, match=message):
        _select_visible(FAKE_GPUS, visible)


# ---------------------------------------------------------------------------------------------------------------
# Several processes competing for the lock


@pytest.mark.parametrize(("holders", "workers"), [(1, 8), (2, 10)])
def test_competing_workers_never_overfill_a_slice(spawn_workers, state_file, holders, workers):
    server_pid = os.getpid()
    crowd = spawn_workers(workers, server_pid=server_pid, holders=holders)

    replies = acquire_all(crowd)

    granted = {w.pid: r["slice"] for w, r in zip(crowd, replies, strict=True) if "slice" in r}
    refused = [r for r in replies if "error" in r]
    assert Counter(granted.values()) == {label: holders for label in ["0", "1", "2", "3"]}
    assert len(refused) == workers - 4 * holders
    assert all("no free GPU slice: all 4 slices of this server are taken" in r["error"] for r in refused)
    assert make_dispatcher(state_file, holders=holders).held_by(server_pid) == granted


def _forked_worker(dispatcher: GPUDispatcher, server_pid: int, results, done) -> None:
    try:
        results.put((os.getpid(), dispatcher.acquire_slice(os.getpid(), server_pid).label))
    except NoFreeSliceError:
        results.put((os.getpid(), None))
    done.wait(30)  # stay alive, and so keep the slice, until the parent has every answer


def test_forked_workers_share_the_masters_dispatcher(state_file):
    # As under gunicorn: the dispatcher is built (and used) in the master, then the workers are forked from it.
    dispatcher = make_dispatcher(state_file)
    assert dispatcher.free_slice_count(os.getpid()) == 4
    fork = multiprocessing.get_context("fork")
    results, done = fork.Queue(), fork.Event()
    children = [fork.Process(target=_forked_worker, args=(dispatcher, os.getpid(), results, done)) for _ in range(6)]
    for child in children:
        child.start()
    try:
        answers = dict(results.get(timeout=20) for _ in children)
        assert sorted(label for label in answers.values() if label) == ["0", "1", "2", "3"]
        assert dispatcher.held_by(os.getpid()) == {pid: label for pid, label in answers.items() if label}
    finally:
        done.set()
        for child in children:
            child.join(timeout=10)
    assert dispatcher.free_slice_count(os.getpid()) == 4  # exited workers' slices are free again


# ---------------------------------------------------------------------------------------------------------------
# Reclaiming slices of dead processes


def test_slice_of_killed_worker_is_reclaimed(spawn_workers, state_file):
    first, second = spawn_workers(2, server_pid=os.getpid(), gpu_ids="0")
    assert first.ask("acquire") == {"slice": "0"}
    assert "error" in second.ask("acquire")  # held while the first worker lives

    first.kill9()

    assert second.ask("acquire") == {"slice": "0"}
    assert make_dispatcher(state_file, "0").held_by(os.getpid()) == {second.pid: "0"}


def test_slice_of_killed_but_unreaped_worker_is_reclaimed(spawn_workers):
    first, second = spawn_workers(2, server_pid=os.getpid(), gpu_ids="0")
    assert first.ask("acquire") == {"slice": "0"}

    os.kill(first.pid, signal.SIGKILL)  # not waited for: it stays a zombie until teardown
    deadline = time.monotonic() + 10
    while psutil.Process(first.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    assert second.ask("acquire") == {"slice": "0"}


def _write_record(state_file: Path, pid: int, started: float) -> None:
    server = f"{os.getpid()}@{psutil.Process(os.getpid()).create_time()}"
    record = {"devices": ["configured:0"], "pid": pid, "started": started, "server": server}
    state_file.write_text(json.dumps({"holdings": [record]}))


def test_record_of_live_process_still_holds_its_slice(spawn_server, state_file):
    pid = spawn_server()
    _write_record(state_file, pid, psutil.Process(pid).create_time())
    with pytest.raises(NoFreeSliceError):
        make_dispatcher(state_file, "0").acquire_slice(os.getpid(), os.getpid())


def test_record_of_reused_pid_counts_as_dead(spawn_server, state_file):
    pid = spawn_server()  # alive, but not the process that wrote the record: its start time differs
    _write_record(state_file, pid, psutil.Process(pid).create_time() - 100.0)
    dispatcher = make_dispatcher(state_file, "0")
    assert dispatcher.acquire_slice(os.getpid(), os.getpid()).label == "0"
    assert dispatcher.held_by(os.getpid()) == {os.getpid(): "0"}


def test_slice_of_a_dead_holder_stays_held_while_a_process_of_its_group_lives(state_file):
    # A worker leads its own process group and its engine's processes join it (gunicorn_llm/ops/engine_processes.py):
    # until the last of them ends, the slice's GPU memory is not free.
    holder = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, time; os.setpgid(0, 0); "
                               "child = subprocess.Popen(['sleep', '60']); print(child.pid, flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    engine = int(holder.stdout.readline())
    try:
        _write_record(state_file, holder.pid, psutil.Process(holder.pid).create_time())
        holder.kill()
        holder.wait(timeout=10)
        with pytest.raises(NoFreeSliceError):
            make_dispatcher(state_file, "0").acquire_slice(os.getpid(), os.getpid())
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(engine) and psutil.Process(engine).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert make_dispatcher(state_file, "0").acquire_slice(os.getpid(), os.getpid()).label == "0"
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# Two servers on one host


def test_second_server_gets_only_the_free_slices(spawn_workers, spawn_server, state_file):
    server_a, server_b = spawn_server(), spawn_server()
    a_workers = spawn_workers(2, server_pid=server_a)
    b_workers = spawn_workers(3, server_pid=server_b)
    dispatcher = make_dispatcher(state_file)

    assert sorted(r["slice"] for r in acquire_all(a_workers)) == ["0", "1"]
    assert dispatcher.free_slice_count(server_b) == 2
    replies = acquire_all(b_workers)

    granted = {w.pid: r["slice"] for w, r in zip(b_workers, replies, strict=True) if "slice" in r}
    (refused,) = [r["error"] for r in replies if "error" in r]
    assert sorted(granted.values()) == ["2", "3"]
    a_pids = sorted(w.pid for w in a_workers)
    assert f"another server's workers, pids {a_pids}, per {state_file}" in refused
    assert dispatcher.free_slice_count(server_a) == 0
    assert dispatcher.free_slice_count(server_b) == 0
    assert sorted(dispatcher.held_by(server_a)) == a_pids
    assert dispatcher.held_by(server_b) == granted


def test_second_server_may_not_share_a_slice_even_with_room(spawn_workers, spawn_server, state_file):
    server_a, server_b = spawn_server(), spawn_server()
    (a_worker,) = spawn_workers(1, server_pid=server_a, gpu_ids="0,1", holders=2)
    b_workers = spawn_workers(3, server_pid=server_b, gpu_ids="0,1", holders=2)
    dispatcher = make_dispatcher(state_file, "0,1", holders=2)

    assert a_worker.ask("acquire") == {"slice": "0"}  # slice 0 still has room for one more holder of server A
    assert dispatcher.free_slice_count(server_a) == 2
    assert dispatcher.free_slice_count(server_b) == 1

    replies = acquire_all(b_workers)

    granted = {w.pid: r["slice"] for w, r in zip(b_workers, replies, strict=True) if "slice" in r}
    (refused,) = [r["error"] for r in replies if "error" in r]
    assert granted == dict.fromkeys(granted, "1") and len(granted) == 2
    assert f"another server's workers, pids [{a_worker.pid}]" in refused
    assert dispatcher.held_by(server_b) == granted


def test_servers_with_different_slice_widths_do_not_overlap(spawn_workers, spawn_server, state_file):
    server_a, server_b = spawn_server(), spawn_server()
    (a_worker,) = spawn_workers(1, server_pid=server_a, per_slice=2)
    b_workers = spawn_workers(3, server_pid=server_b, per_slice=1)

    assert a_worker.ask("acquire") == {"slice": "0,1"}
    replies = acquire_all(b_workers)

    assert sorted(r.get("slice", "refused") for r in replies) == ["2", "3", "refused"]


# ---------------------------------------------------------------------------------------------------------------
# Waiting for a slice


def test_acquire_waits_for_a_slice_released_by_another_process(spawn_workers):
    holder, waiter = spawn_workers(2, server_pid=os.getpid(), gpu_ids="0")
    assert holder.ask("acquire") == {"slice": "0"}

    started = time.monotonic()
    waiter.send("acquire 5")
    time.sleep(0.5)
    assert holder.ask("release") == {"released": True}

    assert waiter.read() == {"slice": "0"}
    assert time.monotonic() - started >= 0.5  # it waited for the release instead of failing


def test_acquire_gives_up_after_wait_s(spawn_workers, state_file):
    (holder,) = spawn_workers(1, server_pid=os.getpid(), gpu_ids="0")
    assert holder.ask("acquire") == {"slice": "0"}
    dispatcher = make_dispatcher(state_file, "0")

    started = time.monotonic()
    with pytest.raises(NoFreeSliceError, match="no free GPU slice"):
        dispatcher.acquire_slice(os.getpid(), os.getpid(), wait_s=1.0)
    assert 1.0 <= time.monotonic() - started < 15  # waited its time, then gave up (bounds loose: noisy CI)


def test_acquire_without_wait_fails_at_once(spawn_workers, state_file):
    (holder,) = spawn_workers(1, server_pid=os.getpid(), gpu_ids="0")
    assert holder.ask("acquire") == {"slice": "0"}

    with pytest.raises(NoFreeSliceError):
        make_dispatcher(state_file, "0").acquire_slice(os.getpid(), os.getpid())


# ---------------------------------------------------------------------------------------------------------------
# Pinning


@pytest.fixture
def clean_cuda_env(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPU_SLICE"):
        monkeypatch.delenv(name, raising=False)


def test_pin_slice_makes_only_its_gpus_visible(clean_cuda_env):
    assert pinned_slice_label() == "unpinned"
    pin_slice(cut_slices(discover_devices("0,1,2,3", None, 0), 2)[1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert os.environ["GPU_SLICE"] == "2,3"
    assert pinned_slice_label() == "2,3"


def test_pin_cpu_slice_hides_every_gpu(clean_cuda_env):
    pin_slice(Slice(1, (Device(key="cpu:x:1", label="cpu1", pin=""),)))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["GPU_SLICE"] == "cpu1"


def test_a_cpu_worker_with_several_cores_keeps_one_free_of_vllm_compute_threads(clean_cuda_env, monkeypatch):
    """vLLM's OpenMP threads get all of the slice's cores but one; the worker's Python threads run on that one
    (docs/benchmarks.md: sharing them made decode steps 2-3x slower). A one-core slice computes on its core."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = tuple(sorted(os.sched_getaffinity(0)))
    try:
        pin_slice(Slice(1, (Device(key="cpu:x:1", label="cpu1", pin=""),), cpu_threads=len(cores), cpu_cores=cores))
        assert os.sched_getaffinity(0) == set(cores)  # the process keeps every core of its slice
        expected = cores[:-1] if len(cores) > 1 else cores
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, expected))
        assert vllm_compute_cores((3,)) == (3,) and vllm_compute_cores((4, 5, 6)) == (4, 5)
    finally:
        os.sched_setaffinity(0, cores)


def _sized_by_the_config(tmp_path: Path, **env: str) -> tuple[int, int]:
    """gunicorn_conf.py's worker count and workers per slice, read in a fresh interpreter (it sizes at import)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("WORKERS_PER_GPU", "GPU_IDS", "INFER_TYPE", "CPU_WORKERS", "PER_PROC_GPUS")}
    environment |= {"DISPATCHER_STATE": str(tmp_path / "slices.json"),
                    "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), **env}
    read = "import gunicorn_conf as c; print(c.workers, c.settings.workers_per_gpu)"
    printed = subprocess.run([sys.executable, "-c", read], cwd=Path(__file__).resolve().parent.parent,
                             env=environment, capture_output=True, text=True, check=True).stdout.split()
    return int(printed[0]), int(printed[1])


@pytest.mark.parametrize(("env", "expected"), [
    ({"GPU_IDS": "0,1", "INFER_TYPE": "vllm"}, (8, 4)),  # the vLLM engine on GPUs: four front ends per slice
    ({"GPU_IDS": "0,1", "INFER_TYPE": "vllm", "WORKERS_PER_GPU": "1"}, (2, 1)),  # an explicit choice stands
    ({"GPU_IDS": "0,1", "INFER_TYPE": "transformers"}, (2, 1)),  # each worker a model copy: one per GPU
    ({"GPU_IDS": "0,1", "INFER_TYPE": "vllm", "PER_PROC_GPUS": "2"}, (1, 1)),  # tensor parallel: not measured
    ({"INFER_TYPE": "vllm", "CPU_WORKERS": "1", "CUDA_VISIBLE_DEVICES": ""}, (1, 1)),  # no GPU: one worker
])
def test_vllm_front_ends_per_slice_default_to_four_on_one_gpu_slices_only(tmp_path, env, expected):
    assert _sized_by_the_config(tmp_path, **env) == expected
