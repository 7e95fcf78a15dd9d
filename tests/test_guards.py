"""Guards that need a real server: backpressure (503 at once past --max-waiting), deadlines (504, the generation
stopped), a client that gives up, monitoring routes left open beside API keys. The rules decided inside one request
(API keys, body size, nesting, prompt counts, context) are checked in process (test_http_inprocess.py)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 15  # generous against a slow machine: the requests that must finish take well under 1 s


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# accepted keys\n{KEY}\n\nanother-key\n")
    server = start_server("--cpu-workers", "1", "--api-key-file", str(keys), "--max-waiting", "2",
                          "--request-timeout", str(TIMEOUT_S), "--max-body-bytes", "4096", "--max-instances", "4")
    server.wait_until_ready(workers=1)
    return server


def post(server, path, body, headers=AUTH, timeout=60, **kwargs):
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout, **kwargs)


def test_monitoring_routes_stay_open_by_default(server):
    for path in ("/health", "/ready", "/metrics", "/workers"):
        assert requests.get(f"{server.url}{path}", timeout=10).status_code == 200


def test_past_its_deadline_a_request_gets_504_and_its_generation_stops(server):
    started = time.monotonic()
    response = post(server, "/infer", {"instances": ["Once upon a time"],
                                       "params": {"max_tokens": 4000, "ignore_eos": True}})
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 10
    wait_until_idle(server)


def test_a_stream_past_its_deadline_ends_with_an_error_event(server):
    response = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4000,
                                                "ignore_eos": True, "stream": True}, stream=True)
    events = [line for line in response.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == 504
    wait_until_idle(server)


def test_beyond_max_waiting_requests_get_503_at_once(server):
    # A long streamed generation keeps the batching thread busy, so requests arriving meanwhile wait for their
    # first token: two may wait (--max-waiting 2), the others are refused at once.
    long = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
                                            "stream": True}, stream=True)
    lines = long.iter_lines()
    next(line for line in lines if line)  # it is generating

    def short(_):
        started = time.monotonic()
        response = post(server, "/infer", {"instances": ["Hi"], "params": {"max_tokens": 2}})
        return response, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(short, i) for i in range(6)]
        deadline = time.monotonic() + TIMEOUT_S
        while sum(f.done() for f in futures) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        long.close()  # the long generation stops; the two waiting requests get the engine
        results = [f.result() for f in futures]
    refused = [(r, elapsed) for r, elapsed in results if r.status_code == 503]
    served = [r for r, _ in results if r.status_code == 200]
    assert len(served) == 2 and len(refused) == 4, [(r.status_code, round(e, 2), r.text[:80]) for r, e in results]
    for response, elapsed in refused:
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["type"] == "overloaded_error"
        assert elapsed < TIMEOUT_S  # refused at once, not after waiting


def wait_until_idle(server):
    deadline = time.monotonic() + 20
    while requests.get(f"{server.url}/ready", timeout=10).json()["running"]:
        assert time.monotonic() < deadline, "the stopped generation kept running"
        time.sleep(0.2)


def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(server):
    with pytest.raises(requests.Timeout):
        post(server, "/infer", {"instances": ["Once upon a time"], "params": {"max_tokens": 4000, "ignore_eos": True}},
             timeout=3)  # the client leaves long before 4000 tokens
    wait_until_idle(server)
    assert '"status": 499' in server.log()  # the access line says the client closed the request
