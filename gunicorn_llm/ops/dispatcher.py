"""GPU dispatcher: cuts the machine's GPUs into slices and gives each gunicorn worker one, host-wide.

Devices are found with NVML (package nvidia-ml-py), never with CUDA, so the gunicorn master that builds the
dispatcher stays free of CUDA state that forked workers would inherit. Which process holds which slice lives in a
JSON file guarded by an OS file lock (`filelock`), by default one file per host: two servers started on one host
split the free GPUs instead of colliding. Holders are recorded by pid and process start time, so a slice held by a
dead process (or by a recycled pid) is reclaimed by the next acquire.

Without NVML or GPUs the dispatcher hands out CPU slices instead (CPU_WORKERS of them, private to the server). A
GPU list can also be given through configuration (GPU_IDS), which lets the slicing and locking run for real with
several processes on a machine that has no GPU.

This module allocates and pins; it does not load models or talk HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock

from gunicorn_llm.ops.engine_processes import group_members

log = logging.getLogger(__name__)

DEFAULT_STATE_FILE = "/tmp/gunicorn-llm-gpu-slices.json"
POLL_INTERVAL_S = 0.5


class DispatchError(Exception):
    """GPU discovery or slicing failed in a way the operator must fix (the message says how)."""


class NoFreeSliceError(DispatchError):
    """Every slice is held by a live process."""


@dataclass(frozen=True)
class Device:
    key: str  # host-wide identity in the state file: the GPU's UUID, a configured id, or a server-private CPU id
    label: str  # what people see in logs and headers: the CUDA index, or "cpuN"
    pin: str  # what CUDA_VISIBLE_DEVICES gets for it ("" for CPU: the worker sees no GPU)


@dataclass(frozen=True)
class Slice:
    index: int
    devices: tuple[Device, ...]
    cpu_cores: tuple[int, ...] = ()  # CPU slices: the cores its worker is pinned to (empty: no pinning)
    cpu_threads: int = 0  # CPU slices: compute threads for its worker

    @property
    def label(self) -> str:
        return ",".join(device.label for device in self.devices)

    @property
    def keys(self) -> list[str]:
        return [device.key for device in self.devices]

    @property
    def is_cpu(self) -> bool:
        return all(device.pin == "" for device in self.devices)


@dataclass(frozen=True)
class Holder:
    """A process that holds a slice: the worker itself and the server (gunicorn master) it belongs to."""

    pid: int
    started: float
    server: str

    @classmethod
    def of(cls, pid: int, server_pid: int) -> Holder:
        return cls(pid=pid, started=_start_time(pid), server=f"{server_pid}@{_start_time(server_pid)}")

    def is_alive(self) -> bool:
        """The holder runs, or it is gone but processes it started in its own process group (a worker's engine,
        engine_processes.py) still do: the slice's GPU memory is not free until they end."""
        try:
            process = psutil.Process(self.pid)
            if process.create_time() != self.started:
                return False  # the pid was reused, which Linux does only once the holder's group is gone too
            if process.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.AccessDenied:  # another user's process behind hidepid: alive as far as we can tell
            return True
        except psutil.NoSuchProcess:
            pass
        except psutil.Error:
            return False
        return bool(group_members(self.pid))


def _start_time(pid: int) -> float:
    return psutil.Process(pid).create_time()


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def discover_devices(configured_ids: str | None, cuda_visible_devices: str | None, cpu_workers: int) -> list[Device]:
    """The devices this server may use, in CUDA's order; CPU devices when there are no GPUs."""
    if configured_ids:
        ids = _split(configured_ids)
        if len(set(ids)) != len(ids):
            raise DispatchError(f"GPU_IDS={configured_ids!r} names a GPU twice")
        return [Device(key=f"configured:{gpu_id}", label=gpu_id, pin=gpu_id) for gpu_id in ids]
    gpus = _nvml_gpus()
    if gpus and cuda_visible_devices is not None:
        gpus = _select_visible(gpus, cuda_visible_devices)
    if gpus:
        return gpus
    return cpu_devices(cpu_workers)


def cpu_devices(count: int) -> list[Device]:
    # Keys carry this process's pid and start time: CPU slices are private to one server, never shared host-wide.
    owner = f"{os.getpid()}@{_start_time(os.getpid())}"
    return [Device(key=f"cpu:{owner}:{n}", label=f"cpu{n}", pin="") for n in range(count)]


def _nvml_gpus() -> list[Device]:
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py is not installed: no GPUs to slice")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        log.info("NVML is not available (%s): no GPUs to slice", error)
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
        return [
            Device(key=_as_str(pynvml.nvmlDeviceGetUUID(handle)), label=str(index), pin=str(index))
            for index in range(count)
            for handle in [pynvml.nvmlDeviceGetHandleByIndex(index)]
        ]
    finally:
        pynvml.nvmlShutdown()


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _select_visible(gpus: list[Device], cuda_visible_devices: str) -> list[Device]:
    """Apply CUDA_VISIBLE_DEVICES as CUDA does: the listed GPUs, in the listed order, by index or UUID (prefix)."""
    selected: list[Device] = []
    for token in _split(cuda_visible_devices):
        if token.isdigit():
            matches = [gpu for gpu in gpus if gpu.label == token]
        else:
            wanted = token if token.startswith(("GPU-", "MIG-")) else f"GPU-{token}"
            matches = [gpu for gpu in gpus if gpu.key.startswith(wanted)]
        if len(matches) != 1:
            # CUDA ignores this entry and every one after it; say so rather than silently serving on fewer GPUs.
            raise DispatchError(
                f"CUDA_VISIBLE_DEVICES entry {token!r} matches {len(matches)} GPUs "
                f"(this host has indices 0-{len(gpus) - 1}); list GPU indices or UUIDs from nvidia-smi -L"
            )
        if matches[0] in selected:
            raise DispatchError(f"CUDA_VISIBLE_DEVICES names GPU {token!r} twice")
        selected.append(matches[0])
    return selected


def _split(listing: str) -> list[str]:
    return [item.strip() for item in listing.split(",") if item.strip()]


def cut_slices(devices: list[Device], per_slice: int) -> list[Slice]:
    if per_slice < 1:
        raise DispatchError(f"PER_PROC_GPUS must be 1 or more, not {per_slice}")
    if devices and devices[0].pin == "":  # CPU workers run one per CPU "device", whatever PER_PROC_GPUS says
        shares = _core_shares(len(devices))
        threads = max(1, len(os.sched_getaffinity(0)) // len(devices))
        return [Slice(index, (device,), shares[index], threads) for index, device in enumerate(devices)]
    if len(devices) % per_slice:
        raise DispatchError(
            f"--per_proc_gpus {per_slice} does not divide the {len(devices)} visible GPUs "
            f"({','.join(d.label for d in devices)}); choose a divisor of {len(devices)} or set --cuda-visible-devices"
        )
    return [
        Slice(index, tuple(devices[start : start + per_slice]))
        for index, start in enumerate(range(0, len(devices), per_slice))
    ]


def _core_shares(workers: int) -> list[tuple[int, ...]]:
    """Disjoint, equal runs of this process's cores, one per CPU worker; none when there are fewer cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        return [()] * workers  # several workers per core: let the OS schedule them
    share = len(cores) // workers
    return [tuple(cores[n * share : (n + 1) * share]) for n in range(workers)]


# ---------------------------------------------------------------------------------------------------------------
# Allocation


class GPUDispatcher:
    """Hands out slices to worker processes through a host-wide, file-locked state file.

    A slice may be held by up to `holders_per_slice` workers of the same server (--workers-per-gpu), and by no
    worker of any other server.
    """

    def __init__(self, slices: list[Slice], holders_per_slice: int = 1, state_file: str = DEFAULT_STATE_FILE):
        if holders_per_slice < 1:
            raise DispatchError(f"WORKERS_PER_GPU must be 1 or more, not {holders_per_slice}")
        self.slices = slices
        self.holders_per_slice = holders_per_slice
        self.state_file = Path(state_file)

    @property
    def worker_count(self) -> int:
        return len(self.slices) * self.holders_per_slice

    def acquire_slice(self, pid: int, server_pid: int, wait_s: float = 0.0) -> Slice:
        """Record `pid` as a holder of a free slice and return it; wait up to `wait_s` for one to free up."""
        holder = Holder.of(pid, server_pid)
        deadline = time.monotonic() + wait_s
        while True:
            with self._locked():
                holdings = self._live_holdings()
                held = [s for s in self.slices for h in holdings if h["pid"] == pid and h["devices"] == s.keys]
                if held:  # asking twice never takes a second slice
                    return held[0]
                chosen = self._first_free(holdings, holder.server)
                if chosen is not None:
                    holdings.append({"devices": chosen.keys, **asdict(holder)})
                    self._save(holdings)
                    return chosen
            if time.monotonic() >= deadline:
                raise NoFreeSliceError(self._no_free_slice_message(holdings, holder.server))
            time.sleep(POLL_INTERVAL_S)

    def release_slice(self, pid: int) -> None:
        """Forget every slice `pid` holds (called when a worker exits; also reclaims dead holders on the way)."""
        with self._locked():
            self._save([h for h in self._live_holdings() if h["pid"] != pid])

    def free_slice_count(self, server_pid: int) -> int:
        """How many slices a worker of `server_pid` could acquire now (the launcher's pre-flight check)."""
        server = Holder.of(server_pid, server_pid).server
        with self._locked():
            holdings = self._live_holdings()
        return sum(self._has_room(slice_, holdings, server) for slice_ in self.slices)

    def held_by(self, server_pid: int) -> dict[int, str]:
        """pid -> slice label for every live worker of this server (for logs and tests)."""
        server = Holder.of(server_pid, server_pid).server
        with self._locked():
            holdings = self._live_holdings()
        by_keys = {tuple(s.keys): s.label for s in self.slices}
        return {h["pid"]: by_keys.get(tuple(h["devices"]), "?") for h in holdings if h["server"] == server}

    def _locked(self) -> FileLock:
        # A fresh lock object per use: the dispatcher is built in the gunicorn master and used in forked workers,
        # and a lock object must not cross a fork.
        return FileLock(str(self.state_file) + ".lock")

    def _first_free(self, holdings: list[dict], server: str) -> Slice | None:
        for slice_ in self.slices:
            if self._has_room(slice_, holdings, server):
                return slice_
        return None

    def _has_room(self, slice_: Slice, holdings: list[dict], server: str) -> bool:
        keys = set(slice_.keys)
        sharing = [h for h in holdings if keys.intersection(h["devices"])]
        if any(h["server"] != server for h in sharing):
            return False
        same = [h for h in sharing if set(h["devices"]) == keys]
        return len(same) == len(sharing) and len(same) < self.holders_per_slice

    def _no_free_slice_message(self, holdings: list[dict], server: str) -> str:
        others = sorted({h["pid"] for h in holdings if h["server"] != server})
        text = f"no free GPU slice: all {len(self.slices)} slices of this server are taken"
        if others:
            text += f" (GPUs held by another server's workers, pids {others}, per {self.state_file})"
        return text

    def _live_holdings(self) -> list[dict]:
        try:
            holdings = json.loads(self.state_file.read_text()).get("holdings", [])
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, AttributeError):
            log.warning("GPU dispatcher state %s was unreadable; starting it afresh", self.state_file)
            return []
        live = []
        for record in holdings:
            holder = Holder(pid=record["pid"], started=record["started"], server=record["server"])
            if holder.is_alive():
                live.append(record)
            else:
                log.info("reclaiming GPU slice %s from dead process %s", record["devices"], record["pid"])
        return live

    def _save(self, holdings: list[dict]) -> None:
        # Written whole and renamed into place: a reader never sees a half-written file.
        scratch = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}")
        scratch.write_text(json.dumps({"holdings": holdings}, indent=1))
        os.replace(scratch, self.state_file)


def pin_slice(slice_: Slice) -> None:
    """Make only this slice's GPUs visible to the current process; call before anything initialises CUDA."""
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's indices then agree with NVML's and nvidia-smi's
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(device.pin for device in slice_.devices)
    os.environ["GPU_SLICE"] = slice_.label
    os.environ["GPU_SLICE_INDEX"] = str(slice_.index)
    if slice_.cpu_threads:
        # CPU workers share the machine's cores: without this, each engine would start a thread per core.
        os.environ["OMP_NUM_THREADS"] = str(slice_.cpu_threads)
    if slice_.cpu_cores:
        os.sched_setaffinity(0, slice_.cpu_cores)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, vllm_compute_cores(slice_.cpu_cores)))


def vllm_compute_cores(cores: tuple[int, ...]) -> tuple[int, ...]:
    """The cores vLLM's OpenMP threads are bound to: all of the slice's but its last one when it has several. The
    worker's Python threads (HTTP, the engine loop, detokenizing) run on that one; sharing the compute cores with
    them made spinning OpenMP threads wait for preempted ones (decode steps 2-3x slower at 4-16 concurrent streams
    on 2 cores). vLLM's own server reserves a core the same way."""
    return cores[:-1] if len(cores) > 1 else cores


def pinned_slice_label() -> str:
    """The label of the slice this worker was pinned to (set by pin_slice in the gunicorn post_fork hook)."""
    return os.environ.get("GPU_SLICE", "unpinned")
