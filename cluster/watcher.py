"""The watcher: keeps every wanted server serving, healthy, and recycled on schedule, one step (`tick`) at a time.

Each tick reads Slurm's view of the jobs (one squeue) and each server's own (/ready, /workers, /metrics), moves the
servers through their phases (state.py), submits servers where some are missing, and rewrites nginx when the set
of serving servers changed. The rules:

- A server joins nginx once every one of its workers has loaded the model.
- A serving server leaves after `failures` failed checks in a row (scancel, no drain: it is not answering), or at
  once when Slurm says its job has ended. A node without a server gets a new one; a node where servers keep ending
  before they are ready is tried again after a growing pause.
- A planned recycle (after `lifetime` plus a random share of `jitter`, or before Slurm's time limit would end the
  job) starts only when every wanted server serves and nothing else is changing: one server at a time. With a free
  node (more nodes than servers) the replacement starts there first and the old server drains once it serves, so
  capacity never drops. Without one the old server drains first and its node then gets the replacement: one
  server fewer, for one restart.
- Draining: out of nginx (reload), then wait until it has nothing in flight (or `drain_timeout`), then scancel.
  gunicorn's master gets Slurm's SIGTERM with nothing left to do, well inside Slurm's KillWait, after which Slurm
  would SIGKILL whatever still runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster import ClusterError, probe, server_job, slurm
from cluster.nginx import Nginx
from cluster.state import DRAINING, SERVING, STARTING, STOPPING, ClusterState, NodeRecord, Server, StateDir


@dataclass(frozen=True)
class WatchOptions:
    interval_s: float = 30  # between ticks
    failures: int = 3  # failed health checks in a row that end a serving server
    lifetime_s: float = 0  # recycle a server after this long serving; 0: only before Slurm's time limit
    jitter_s: float = 0  # plus a random part of this, so that servers started together are not recycled together
    drain_timeout_s: float = 300  # the longest a draining server may finish its requests before scancel
    drain_grace_s: float = 2  # after nginx's reload, before an empty server counts as drained (requests in transit)
    start_timeout_s: float = 3600  # from the job's start until every worker has loaded the model
    check_timeout_s: float = 10  # one HTTP check
    max_backoff_s: float = 600  # the longest pause before another try on a node whose servers fail to start


class Watcher:
    def __init__(self, state_dir: StateDir, options: WatchOptions, bringing_up: bool = False):
        """`bringing_up` (for `up`): a server that fails to start is an error (bad options, most likely), not retried,
        and nothing is recycled."""
        self.state_dir = state_dir
        self.options = options
        self.bringing_up = bringing_up

    def run(self, stop: threading.Event, until: Callable[[ClusterState], bool] | None = None,
            timeout_s: float | None = None) -> ClusterState:
        """Tick every interval until `stop` is set, or `until(state)` holds (ClusterError after `timeout_s`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self.state_dir.locked():
                state = self.state_dir.load()
                if state is None:
                    raise ClusterError(f"no cluster is up in {self.state_dir.path} (taken down?)", 1)
                try:
                    self.tick(state)
                except ClusterError as error:
                    if self.bringing_up:
                        raise
                    self.state_dir.record("error", message=str(error))  # Slurm or nginx hiccup: next tick retries
                finally:
                    self.state_dir.save(state)
            if until is not None and until(state):
                return state
            if deadline is not None and time.monotonic() > deadline:
                waiting = ", ".join(f"{s.node} {s.phase} (job {s.job_id})" for s in state.servers if s.phase != SERVING)
                raise ClusterError(f"not every server was ready within {timeout_s:.0f} s: {waiting}", 1)
            if stop.wait(self.options.interval_s):
                return state

    def tick(self, state: ClusterState) -> None:
        jobs = slurm.jobs([server.job_id for server in state.servers])
        for server in list(state.servers):
            self._follow(state, server, jobs.get(server.job_id))
        self._fill(state)
        if not self.bringing_up:
            self._recycle(state)
        self._apply_upstreams(state)

    # --- one server ------------------------------------------------------------------------------------------------

    def _follow(self, state: ClusterState, server: Server, job: slurm.Job | None) -> None:
        if job is None or not job.holds_node:
            self._job_ended(state, server, job.state if job else "no longer listed")
            return
        server.job_ends = job.ends
        if server.phase == STOPPING:
            return
        if job.state in slurm.ENDING_STATES:
            if server.phase == STARTING:
                self._start_failed(state, server, f"ended before it was ready (job {job.state})")
            self._stopping(server, f"its job is {job.state}", cancel=False)
        elif server.phase == STARTING and job.running:
            reason = probe.not_ready_to_join(server.url, self.options.check_timeout_s)
            if reason is None:
                self._serve(state, server)
            elif job.started is not None and time.time() - job.started > self.options.start_timeout_s:
                self._start_failed(state, server, f"was not ready {self.options.start_timeout_s:.0f} s after its "
                                                  f"job started ({reason})")
                self._stopping(server, "start timeout")
        elif server.phase == SERVING:
            reason = probe.unhealthy(server.url, self.options.check_timeout_s)
            server.failures = 0 if reason is None else server.failures + 1
            if reason is not None:
                self.state_dir.record("check_failed", node=server.node, job=server.job_id, failures=server.failures,
                                      reason=reason)
            if server.failures >= self.options.failures:
                self._stopping(server, f"{server.failures} failed checks")
        elif server.phase == DRAINING and server.drain_started is not None:
            draining_for = time.time() - server.drain_started
            in_flight = probe.in_flight(server.url, self.options.check_timeout_s)
            if draining_for >= self.options.drain_grace_s and not in_flight:
                self._stopping(server, "drained")
            elif draining_for > self.options.drain_timeout_s:
                self._stopping(server, f"drain timeout with {in_flight} request(s) in flight")

    def _serve(self, state: ClusterState, server: Server) -> None:
        server.phase, server.serving_since, server.failures = SERVING, time.time(), 0
        state.node(server.node).start_failures = 0
        self.state_dir.record("serving", node=server.node, job=server.job_id,
                              after_s=round(server.serving_since - server.submitted_at, 1))
        replaced = state.server(server.replaces) if server.replaces else None
        if replaced is not None and replaced.phase == SERVING:
            self._drain(replaced, f"replaced by job {server.job_id} on {server.node}")

    def _drain(self, server: Server, why: str) -> None:
        """Out of nginx at this tick's end; the drain clock starts once nginx has reloaded."""
        server.phase, server.retiring, server.drain_started = DRAINING, False, None
        self.state_dir.record("draining", node=server.node, job=server.job_id, why=why)

    def _stopping(self, server: Server, why: str, cancel: bool = True) -> None:
        if cancel:
            slurm.cancel([server.job_id])
        server.phase = STOPPING
        self.state_dir.record("stopping", node=server.node, job=server.job_id, why=why)

    def _job_ended(self, state: ClusterState, server: Server, job_state: str) -> None:
        state.servers.remove(server)
        if server.phase == STARTING:
            self._start_failed(state, server, f"ended before it was ready (job {job_state})")
        else:
            self.state_dir.record("ended" if server.phase == STOPPING else "failed", node=server.node,
                                  job=server.job_id, job_state=job_state)

    def _start_failed(self, state: ClusterState, server: Server, what: str) -> None:
        if self.bringing_up:
            raise ClusterError(f"the server on {server.node} (job {server.job_id}) {what}; its log "
                               f"({self.state_dir.job_log(server.node, server.job_id)}) ends: "
                               f"{server_job.log_tail(self.state_dir, server)}", 1)
        node = state.node(server.node)
        node.start_failures += 1
        pause = min(self.options.interval_s * 2 ** node.start_failures, self.options.max_backoff_s)
        node.retry_at = time.time() + pause
        replaced = state.server(server.replaces) if server.replaces else None
        if replaced is not None:
            replaced.retiring = False  # the recycle will be tried again
        self.state_dir.record("start_failed", node=server.node, job=server.job_id, what=what, retry_in_s=pause)

    # --- the whole cluster -----------------------------------------------------------------------------------------

    def _free_nodes(self, state: ClusterState) -> list[NodeRecord]:
        occupied = {server.node for server in state.servers}
        now = time.time()
        return [node for node in state.nodes if node.name not in occupied and node.retry_at <= now]

    def _fill(self, state: ClusterState) -> None:
        """Submit servers until the wanted number are starting or serving (a retiring one does not count)."""
        live = [s for s in state.servers if s.phase in (STARTING, SERVING) and not s.retiring]
        for node in self._free_nodes(state)[: max(0, state.servers_wanted - len(live))]:
            server_job.submit(self.state_dir, state, node)

    def _recycle_due(self, server: Server) -> tuple[float, str] | None:
        """When a serving server is due for a planned recycle, and why; None if never."""
        due = []
        if self.options.lifetime_s > 0:
            jitter = server.recycle_draw * self.options.jitter_s
            due.append((server.serving_since + self.options.lifetime_s + jitter, "lifetime"))
        if server.job_ends is not None:
            # Gone before Slurm's time limit kills it: time for a replacement to start (as long as this one took),
            # the drain and two checks. But not in its first half of serving: a time limit too short for that would
            # otherwise recycle servers as fast as they start.
            start_s = server.serving_since - server.submitted_at
            margin = start_s + self.options.drain_timeout_s + 2 * self.options.interval_s
            halfway = (server.serving_since + server.job_ends) / 2
            due.append((max(server.job_ends - margin, halfway), "time limit"))
        return min(due, default=None)

    def _recycle(self, state: ClusterState) -> None:
        steady = all(s.phase == SERVING and not s.retiring for s in state.servers)
        if not steady or len(state.servers) < state.servers_wanted:
            return
        now = time.time()
        due = sorted((*when, s.job_id) for s in state.servers if (when := self._recycle_due(s)) and when[0] <= now)
        if not due:
            return
        _, why, job_id = due[0]
        server = state.server(job_id)
        free = self._free_nodes(state)
        target = free[0].name if free else server.node
        self.state_dir.record("recycling", node=server.node, job=server.job_id, why=why, replacement_on=target)
        if free:
            server.retiring = True
            server_job.submit(self.state_dir, state, free[0], replaces=server.job_id)
        else:
            self._drain(server, "planned recycle")

    def _apply_upstreams(self, state: ClusterState) -> None:
        """nginx serves exactly the serving servers (and runs: a dead nginx is started again); a draining server's
        clock starts once nginx no longer sends to it."""
        upstreams = sorted(s.upstream for s in state.servers if s.phase == SERVING)
        nginx = Nginx(self.state_dir.nginx, state.proxy)
        if upstreams != state.upstreams or nginx.pid() is None:
            restarting = nginx.pid() is None and bool(state.upstreams)
            nginx.apply(upstreams)
            if restarting:  # recorded once nginx listens again, so that the event means it serves
                self.state_dir.record("nginx_restart", why="nginx was not running")
            state.upstreams = upstreams
            self.state_dir.record("nginx", upstreams=upstreams)
        for server in state.servers:
            if server.phase == DRAINING and server.drain_started is None:
                server.drain_started = time.time()
