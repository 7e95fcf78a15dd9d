"""nginx in front of the servers: its config (checked with `nginx -t` before use) and its process.

One nginx per cluster. Everything it writes (pid, logs, temp folders) lives in its folder under the cluster's state
directory, so it needs no system configuration and leaves nothing elsewhere. Servers join and leave by rewriting the
upstream block and reloading: nginx starts new workers with the new config, and the old ones stop accepting but
finish the requests they are proxying.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster import ClusterError

COMMAND_TIMEOUT_S = 30
RELOAD_TIMEOUT_S = 10
UPSTREAM = "gunicorn_llm"
# What nginx answers while no server is ready: the servers' own error shape, and a hint when to come back.
NO_SERVER_BODY = ('{"error": {"message": "no server of this cluster is ready yet", "type": "service_unavailable", '
                  '"param": null, "code": 503}}')


@dataclass(frozen=True)
class ProxySettings:
    listen: str  # host:port nginx listens on
    max_fails: int = 2  # passive health check: failed attempts within fail_timeout that take a server out ...
    fail_timeout_s: int = 10  # ... for this long
    read_timeout_s: int = 3600  # a generation may be silent (no stream) this long; above the servers' own deadline
    max_body: str = "8m"  # the servers' --max-body-bytes default; bodies this size are kept in memory
    retry_window_s: int = 30  # a failed request goes to another server only within this time of its start


def render(directory: Path, upstreams: list[str], proxy: ProxySettings) -> str:
    """The whole nginx.conf: `upstreams` (host:port) behind `proxy.listen`, or a 503 while there are none."""
    servers = "".join(f"        server {address} max_fails={proxy.max_fails} fail_timeout={proxy.fail_timeout_s}s;\n"
                      for address in upstreams)
    if upstreams:
        location = f"""\
            proxy_pass http://{UPSTREAM};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # Tokens reach the client as they are generated.
            proxy_buffering off;
            # Request bodies (prompts: small) are read whole before a server is chosen. nginx cannot resend a body it
            # has streamed to a server, so without this no refused POST could be passed to another server.
            proxy_request_buffering on;
            proxy_connect_timeout 5s;
            proxy_send_timeout {proxy.read_timeout_s}s;
            proxy_read_timeout {proxy.read_timeout_s}s;
            # Which failures go to another server. nginx never retries once the client has had a byte of the answer,
            # and generating changes nothing on a server, so a POST may be passed on (non_idempotent): after `error`
            # or `timeout` on connecting (a dead or unreachable server never saw it) or when a server died before
            # answering (its work is lost anyway), and after a 503, which this server sends only for what it
            # refused before any work (backpressure, model still loading, dead engine, draining); 502 for a proxy
            # in between. The retry window keeps a request that failed late (a long generation) from running twice,
            # and the one extra try keeps a request that crashes servers from taking down every node.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_next_upstream_timeout {proxy.retry_window_s}s;
            # Which server answered (also in the access log), for debugging.
            add_header X-Upstream-Addr $upstream_addr always;
"""
    else:
        location = f"""\
            default_type application/json;
            add_header Retry-After 5 always;
            return 503 '{NO_SERVER_BODY}\\n';
"""
    upstream_block = (f"""\
    upstream {UPSTREAM} {{
        # One view of connection counts and failures across nginx's workers (without it each worker balances and
        # counts failures on its own).
        zone {UPSTREAM} 64k;
        # Generation times vary widely: send each request to the server with the fewest under way.
        least_conn;
{servers}    }}
""" if upstreams else "")
    return f"""\
# Written by `python -m cluster` whenever a server joins or leaves; edits here are lost.
worker_processes auto;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    log_format upstreams '$time_iso8601 $remote_addr "$request" $status $body_bytes_sent '
                         'upstream=$upstream_addr upstream_status=$upstream_status time=$request_time';
    access_log {directory}/access.log upstreams;
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;
    client_max_body_size {proxy.max_body};
    client_body_buffer_size {proxy.max_body};

{upstream_block}
    server {{
        listen {proxy.listen};
        location / {{
{location}        }}
    }}
}}
"""


class Nginx:
    """The cluster's nginx: `apply` writes a checked config and starts nginx or reloads it; `stop` ends it."""

    def __init__(self, directory: Path, proxy: ProxySettings):
        self.directory = directory
        self.proxy = proxy
        self.conf = directory / "nginx.conf"
        self.pid_file = directory / "nginx.pid"

    @staticmethod
    def require() -> None:
        if shutil.which("nginx") is None:
            raise ClusterError("nginx is not on PATH: install it (Debian: apt-get install nginx)")

    def _nginx(self, *args: str, conf: Path | None = None) -> None:
        command = ["nginx", "-p", str(self.directory), "-e", str(self.directory / "error.log"),
                   "-c", str(conf or self.conf), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"`nginx {' '.join(args)}` did not finish within {COMMAND_TIMEOUT_S} s", 1) from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "[emerg]" in line or "[alert]" in line]
            raise ClusterError(f"nginx: {(lines or done.stderr.splitlines() or ['failed'])[-1]}", 1)

    def pid(self) -> int | None:
        """The master's pid while it runs."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def apply(self, upstreams: list[str]) -> None:
        """Serve `upstreams` from now on: check the new config, put it in place, then start or reload nginx."""
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        candidate = self.conf.with_suffix(".new")
        candidate.write_text(render(self.directory, upstreams, self.proxy))
        self._nginx("-t", "-q", conf=candidate)
        candidate.replace(self.conf)
        if self.pid() is None:
            self._nginx()  # nginx daemonizes: the master keeps running after this returns
        else:
            self._reload()

    def _reload(self) -> None:
        """Reload, and return once only workers with the new config accept connections: the master starts new
        workers first, then tells the old ones to stop accepting (they finish what they proxy, titled
        "worker process is shutting down")."""
        master = psutil.Process(self.pid())
        old_workers = master.children()
        self._nginx("-s", "reload")
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while any(_accepting(worker) for worker in old_workers) or not set(master.children()) - set(old_workers):
            if time.monotonic() > deadline:
                raise ClusterError(f"nginx did not switch to its new config within {RELOAD_TIMEOUT_S} s of a reload "
                                   f"(see {self.directory / 'error.log'})", 1)
            time.sleep(0.05)

    def stop(self, timeout_s: float = 30) -> None:
        """Graceful quit (proxied requests finish), then SIGKILL for the master and its workers after `timeout_s`."""
        pid = self.pid()
        if pid is None:
            return
        master = psutil.Process(pid)
        workers = master.children()
        os.kill(pid, signal.SIGQUIT)
        _gone, alive = psutil.wait_procs([master, *workers], timeout=timeout_s)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)


def _accepting(worker: psutil.Process) -> bool:
    """Whether an nginx worker still takes new connections (it is alive and not shutting down)."""
    try:
        return "shutting down" not in " ".join(worker.cmdline()) and worker.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
