"""What `up`, `watch`, `status` and `down` do. __main__.py turns the command line into these calls.

`up` checks everything it can before it starts anything (Slurm's and nginx's commands, the nodes, the addresses and
ports); once it has started something, any failure takes all of it down again before the error is reported.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import psutil

from cluster import ClusterError, probe, slurm
from cluster.nginx import Nginx, ProxySettings
from cluster.state import SERVING, ClusterState, NodeRecord, StateDir
from cluster.watcher import Watcher, WatchOptions

SET_BY_CLUSTER = ("--host", "--port")  # launcher options the cluster sets itself, the same for nginx
JOBS_END_TIMEOUT_S = 120
WATCHER_STOP_TIMEOUT_S = 60
UP_POLL_S = 2.0


@dataclass(frozen=True)
class UpRequest:
    nodes: str | None  # a Slurm hostlist
    reservation: str | None  # its nodes, when `nodes` is not given; jobs run in it
    servers: int | None  # None: one per node
    port: int
    bind: str  # the address servers listen on, or "node"
    gpus_per_node: int | None  # None: what each node's Gres declares
    sbatch_options: list[str]
    launcher_options: list[str]
    proxy: ProxySettings


def up(state_dir: StateDir, request: UpRequest, options: WatchOptions, stop: threading.Event) -> ClusterState:
    """Start nginx and one server per node; return once every server serves behind nginx. If anything fails on the
    way, or `stop` is set first, take down everything started and raise."""
    state = _checked_state(state_dir, request)
    state_dir.create()
    try:
        state_dir.save(state)
        Nginx(state_dir.nginx, state.proxy).apply([])  # answers 503 until a server is ready
        state_dir.record("up", nodes=[node.name for node in state.nodes], listen=state.proxy.listen)
        starting = Watcher(state_dir, dataclasses.replace(options, interval_s=min(options.interval_s, UP_POLL_S)),
                           bringing_up=True)
        state = starting.run(stop, until=_all_serving, timeout_s=options.start_timeout_s)
        if not _all_serving(state):
            raise ClusterError("interrupted before every server was ready; took everything down again", 1)
        return state
    except BaseException:
        try:
            down(state_dir)
        except ClusterError as cleanup:  # the first error is the one to report; this one goes to the events
            state_dir.record("error", message=f"taking the failed start down: {cleanup}")
        raise


def _all_serving(state: ClusterState) -> bool:
    return sum(server.phase == SERVING for server in state.servers) >= state.servers_wanted


def _checked_state(state_dir: StateDir, request: UpRequest) -> ClusterState:
    slurm.require_commands()
    Nginx.require()
    if state_dir.load() is not None:
        raise ClusterError(f"a cluster is already up in {state_dir.path}: `python -m cluster down` first")
    for option in request.launcher_options:
        if option.split("=")[0] in SET_BY_CLUSTER:
            raise ClusterError(f"launcher option {option.split('=')[0]} is set by the cluster command: use its "
                               f"--port and --bind instead")
    names = _node_names(request)
    nodes = slurm.describe_nodes(names)
    by_address: dict[str, str] = {}
    for node in nodes:
        if node.address in by_address:
            raise ClusterError(f"nodes {by_address[node.address]} and {node.name} share the address {node.address}: "
                               f"their servers would clash on port {request.port}")
        by_address[node.address] = node.name
    servers = len(nodes) if request.servers is None else request.servers
    if not 1 <= servers <= len(nodes):
        raise ClusterError(f"--servers {servers}: between 1 and the {len(nodes)} node(s) given")
    _check_listen(request.proxy.listen, request.port, list(by_address))
    reservation = [f"--reservation={request.reservation}"] if request.reservation else []
    sbatch_options = [*request.sbatch_options, *reservation]
    return ClusterState(
        nodes=[NodeRecord(node.name, node.address, node.gpus if request.gpus_per_node is None
                          else request.gpus_per_node) for node in nodes],
        servers_wanted=servers, port=request.port, bind=request.bind, launcher_options=request.launcher_options,
        sbatch_options=sbatch_options, proxy=request.proxy,
    )


def _node_names(request: UpRequest) -> list[str]:
    if request.nodes is None and request.reservation is None:
        raise ClusterError("no nodes: give --nodes (a Slurm hostlist such as gpu[01-04]) or --reservation")
    if request.nodes is not None:
        if not request.nodes.strip():
            raise ClusterError("--nodes is empty: give node names (a Slurm hostlist such as gpu[01-04])")
        try:
            names = slurm.expand_hostlist(request.nodes)
        except ClusterError as error:
            raise ClusterError(f"--nodes {request.nodes!r} is not a Slurm hostlist ({error})") from None
    else:
        names = slurm.reservation_nodes(request.reservation)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ClusterError(f"node(s) listed twice: {', '.join(repeated)}")
    return names


def _check_listen(listen: str, server_port: int, node_addresses: list[str]) -> None:
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterError(f"--listen {listen!r}: give HOST:PORT, e.g. 0.0.0.0:8000")
    port = int(port_text)
    if port == server_port and (host in node_addresses or any(_is_loopback(a) for a in node_addresses)):
        raise ClusterError(f"--listen {listen} clashes with the servers' port {server_port} on this host")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx does: TIME_WAIT is no clash
        try:
            probe_socket.bind((host, port))
        except OSError as error:
            raise ClusterError(f"nginx cannot listen on {listen}: {error.strerror}") from None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def watch(state_dir: StateDir, options: WatchOptions, stop: threading.Event) -> None:
    """Run the watcher until `stop` is set; one watcher per cluster."""
    with state_dir.locked():
        state = _existing(state_dir)
        if state.watcher_pid not in (None, os.getpid()) and _is_watcher(state.watcher_pid):
            raise ClusterError(f"a watcher already runs for {state_dir.path} (pid {state.watcher_pid})")
        state.watcher_pid = os.getpid()
        state_dir.save(state)
    state_dir.record("watching", pid=os.getpid(), **{k: v for k, v in dataclasses.asdict(options).items()})
    try:
        Watcher(state_dir, options).run(stop)
    finally:
        with state_dir.locked():
            state = state_dir.load()
            if state is not None and state.watcher_pid == os.getpid():
                state.watcher_pid = None
                state_dir.save(state)
        state_dir.record("watch_stopped", pid=os.getpid())


def _existing(state_dir: StateDir) -> ClusterState:
    state = state_dir.load()
    if state is None:
        raise ClusterError(f"no cluster is up in {state_dir.path} (`python -m cluster up` starts one)")
    return state


def _is_watcher(pid: int | None) -> bool:
    try:
        return pid is not None and "cluster" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _ended(process: psutil.Process, timeout_s: float) -> bool:
    """Wait until the process has exited (a zombie its parent has not reaped yet counts: it runs no more)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def status(state_dir: StateDir) -> str:
    """The cluster as a short report: nginx, the watcher, every server with Slurm's and its own view, last events."""
    state = _existing(state_dir)
    nginx_pid = Nginx(state_dir.nginx, state.proxy).pid()
    jobs = slurm.jobs([server.job_id for server in state.servers])
    lines = [f"nginx: http://{state.proxy.listen} " + (f"(pid {nginx_pid})" if nginx_pid else "(not running)"),
             "watcher: " + (f"pid {state.watcher_pid}" if _is_watcher(state.watcher_pid)
                             else "not running (`python -m cluster watch`)"),
             f"servers: {sum(s.phase == SERVING for s in state.servers)} of {state.servers_wanted} serving",
             f"{'node':<16} {'address':<22} {'job':<10} {'slurm':<12} {'phase':<10} check"]
    for server in state.servers:
        job = jobs.get(server.job_id)
        check = probe.unhealthy(server.url, timeout_s=2) or "ready"
        lines.append(f"{server.node:<16} {server.upstream:<22} {server.job_id:<10} "
                     f"{job.state if job else 'ended':<12} {server.phase:<10} {check}")
    if state_dir.events.exists():
        lines.append("recent events:")
        for line in state_dir.events.read_text().splitlines()[-5:]:
            event = json.loads(line)
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(event.pop('time')))} {event.pop('event')} "
                         + " ".join(f"{key}={value}" for key, value in event.items()))
    return "\n".join(lines)


def down(state_dir: StateDir) -> list[str] | None:
    """Stop the watcher, cancel every job, stop nginx, forget the state. The ended jobs' ids; None if none was up."""
    state = state_dir.load()
    if state is None:
        return None
    if state.watcher_pid not in (None, os.getpid()) and _is_watcher(state.watcher_pid):
        watcher = psutil.Process(state.watcher_pid)
        watcher.terminate()  # it finishes its tick and exits
        if not _ended(watcher, WATCHER_STOP_TIMEOUT_S):
            watcher.kill()
    with state_dir.locked():
        state = _existing(state_dir)
        job_ids = [server.job_id for server in state.servers]
        slurm.cancel(job_ids)  # SIGTERM: each gunicorn master finishes what it runs, within Slurm's KillWait
        Nginx(state_dir.nginx, state.proxy).stop()  # graceful: proxied requests finish first
        deadline = time.monotonic() + JOBS_END_TIMEOUT_S
        while any(job.holds_node for job in slurm.jobs(job_ids).values()):
            if time.monotonic() > deadline:
                raise ClusterError(f"jobs {', '.join(job_ids)} did not end within {JOBS_END_TIMEOUT_S} s "
                                   f"of scancel (see squeue)", 1)
            time.sleep(0.5)
        state_dir.forget()
        state_dir.record("down", jobs=job_ids)
    return job_ids
