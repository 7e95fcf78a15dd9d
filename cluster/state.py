"""The cluster's record on disk, so that `watch`, `status` and `down` act on exactly what `up` started.

One JSON file in the state directory, replaced atomically, read and written under a file lock. Beside it: the
servers' job logs (logs/), nginx's folder (nginx/), and events.jsonl, one JSON line per thing the commands did
(submitted, serving, draining, ...), which `status` shows the end of and tests read.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from cluster.nginx import ProxySettings

# A server's phases, in order. starting: its job is queued or loading; serving: in nginx; draining: out of nginx,
# finishing what it has; stopping: scancel sent, waiting for Slurm to end the job.
STARTING, SERVING, DRAINING, STOPPING = "starting", "serving", "draining", "stopping"
LOCK_TIMEOUT_S = 120


@dataclass
class Server:
    node: str
    address: str
    port: int
    job_id: str
    submitted_at: float
    phase: str = STARTING
    serving_since: float | None = None
    recycle_draw: float = field(default_factory=random.random)  # where in [0, jitter] its lifetime's jitter falls
    failures: int = 0  # consecutive failed health checks
    replaces: str | None = None  # the job this server takes over from, in a recycle onto a free node
    retiring: bool = False  # a replacement is starting: serves until that one serves, then drains
    drain_started: float | None = None
    job_ends: float | None = None  # when Slurm's time limit ends the job, if it has one

    @property
    def upstream(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.upstream}"


@dataclass
class NodeRecord:
    name: str
    address: str
    gpus: int  # the gres each of its jobs asks for (0: none)
    start_failures: int = 0  # servers in a row that ended before they were ready
    retry_at: float = 0.0  # no new server here before this (backing off after failed starts)


@dataclass
class ClusterState:
    nodes: list[NodeRecord]
    servers_wanted: int
    port: int
    bind: str  # the address servers listen on, or "node": each its node's address
    launcher_options: list[str]  # passed through to start_gunicorn.sh
    sbatch_options: list[str]  # for every job, besides the per-node ones
    proxy: ProxySettings
    servers: list[Server] = field(default_factory=list)
    upstreams: list[str] = field(default_factory=list)  # what nginx serves now
    watcher_pid: int | None = None

    def node(self, name: str) -> NodeRecord:
        return next(node for node in self.nodes if node.name == name)

    def server(self, job_id: str) -> Server | None:
        return next((server for server in self.servers if server.job_id == job_id), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        raw = json.loads(text)
        return cls(**{**raw, "nodes": [NodeRecord(**node) for node in raw["nodes"]],
                      "servers": [Server(**server) for server in raw["servers"]],
                      "proxy": ProxySettings(**raw["proxy"])})


class StateDir:
    def __init__(self, path: Path):
        self.path = path
        self.state_file = path / "cluster.json"
        self.logs = path / "logs"
        self.nginx = path / "nginx"
        self.events = path / "events.jsonl"
        self._lock = FileLock(path / "cluster.lock", timeout=LOCK_TIMEOUT_S)

    def create(self) -> None:
        for folder in (self.path, self.logs, self.nginx):
            folder.mkdir(parents=True, exist_ok=True)

    def locked(self) -> FileLock:
        """Hold while reading-and-changing the state: the watcher and the other commands take turns."""
        return self._lock

    def load(self) -> ClusterState | None:
        try:
            return ClusterState.from_json(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: ClusterState) -> None:
        partial = self.state_file.with_suffix(".partial")
        partial.write_text(state.to_json())
        partial.replace(self.state_file)

    def forget(self) -> None:
        self.state_file.unlink(missing_ok=True)

    def record(self, event: str, **fields) -> None:
        """Append an event to events.jsonl and print it, for the command's own output."""
        entry = {"time": round(time.time(), 3), "event": event, **fields}
        with self.events.open("a") as events:
            events.write(json.dumps(entry) + "\n")
        details = " ".join(f"{key}={value}" for key, value in fields.items())
        print(f"{time.strftime('%H:%M:%S')} {event} {details}", flush=True)

    def job_log(self, node: str, job_id: str = "%j") -> Path:
        return self.logs / f"{node}-{job_id}.log"
