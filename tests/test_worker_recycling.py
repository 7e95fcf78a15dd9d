"""`--max-requests`: gunicorn recycles a worker after N requests; the replacement takes the freed slice and serves."""

from __future__ import annotations

import time

import pytest
import requests


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server("--cpu-workers", "1", "--max-requests", "3")
    # Readiness from the log, not by polling /ready: every poll would count towards the 3 requests.
    deadline = time.monotonic() + 180
    while "model loaded on slice" not in server.log():
        assert server.process.poll() is None and time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    return server


def test_recycled_worker_is_replaced_on_the_same_slice(server):
    (first_pid,) = server.worker_pids()
    first_slice = "cpu0"
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 120
    while len(seen) < 2:  # keep asking until an answer comes from the replacement
        assert time.monotonic() < deadline, f"no replacement after max_requests; served by {seen}"
        response = requests.post(f"{server.url}/infer", json={"instances": ["Hi"], "params": {"max_tokens": 1}})
        assert response.status_code == 200, response.text
        seen[int(response.headers["X-Worker-Pid"])] = response.headers["X-GPU-Slice"]
    assert first_pid in seen
    replacement = next(pid for pid in seen if pid != first_pid)
    assert seen[replacement] == first_slice
    assert "Autorestarting worker after current request" in server.log()
