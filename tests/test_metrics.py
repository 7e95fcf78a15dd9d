"""/metrics, /workers, access lines and request ids on a real 2-worker server, read with prometheus_client's parser."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from conftest import metric_value, scrape_metrics


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server("--cpu-workers", "2")
    server.slices = server.wait_until_ready(workers=2)
    return server


def test_counts_requests_and_tokens_over_all_workers(server):
    before = scrape_metrics(server)
    for _ in range(6):  # enough requests that both workers answer some
        server.infer(["1, 2, 3,"], temperature=0, max_tokens=4, ignore_eos=True)
    after = scrape_metrics(server)
    route = {"route": "/infer", "status": "200"}
    assert metric_value(after["llm_requests"], "llm_requests_total", **route) - \
        metric_value(before.get("llm_requests", []), "llm_requests_total", **route) == 6
    assert metric_value(after["llm_generation_tokens"], "llm_generation_tokens_total") - \
        metric_value(before.get("llm_generation_tokens", []), "llm_generation_tokens_total") == 24
    usage = requests.post(f"{server.url}/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 1}).json()
    prompt_tokens = usage["usage"]["prompt_tokens"]
    assert metric_value(scrape_metrics(server)["llm_prompt_tokens"], "llm_prompt_tokens_total") - \
        metric_value(before.get("llm_prompt_tokens", []), "llm_prompt_tokens_total") == 7 * prompt_tokens


def test_counts_the_engine_path_of_each_prompt(server):
    """On CPU the transformers engine generates through batched generate (the slot engine's choice of path is
    pinned in test_slot_batching.py); prompt log-probabilities have a path of their own."""
    before = scrape_metrics(server).get("llm_engine_path", [])
    server.infer(["1, 2, 3,", "Hi"], temperature=0, seed=1, max_tokens=2)
    server.infer(["1, 2, 3,", "Hi", "Once upon a time"], prompt_logprobs=0)
    after = scrape_metrics(server)["llm_engine_path"]
    for path, prompts in (("generate", 2), ("prompt_logprobs", 3), ("slots", 0), ("continuous", 0)):
        assert metric_value(after, "llm_engine_path_total", path=path) - \
            metric_value(before, "llm_engine_path_total", path=path) == prompts, path


def test_latency_histograms_are_filled(server):
    server.infer(["Once upon a time"], temperature=0, max_tokens=6, ignore_eos=True)
    families = scrape_metrics(server)
    assert metric_value(families["llm_time_to_first_token_seconds"], "llm_time_to_first_token_seconds_count") >= 1
    assert metric_value(families["llm_inter_token_latency_seconds"], "llm_inter_token_latency_seconds_count") >= 5
    assert metric_value(families["llm_request_duration_seconds"], "llm_request_duration_seconds_count",
                        route="/infer") >= 1


def test_running_waiting_and_ready_gauges_are_per_worker(server):
    families = scrape_metrics(server)
    ready = {s.labels["worker"]: s.labels["slice"] for s in families["llm_worker_ready"] if s.value == 1}
    assert ready == {str(pid): slice_ for pid, slice_ in server.slices.items()}
    for name in ("llm_requests_running", "llm_requests_waiting"):
        assert {s.labels["worker"] for s in families[name]} == set(ready)
        assert all(s.value == 0 for s in families[name])  # nothing in flight now


def test_workers_route_gives_the_server_wide_view(server):
    view = requests.get(f"{server.url}/workers", timeout=10).json()
    assert view["workers"] == 2 and view["loaded"] == 2
    assert {(w["pid"], w["slice"]) for w in view["ready"]} == set(server.slices.items())


def test_workers_route_counts_each_workers_generation_requests(server):
    before = {w["pid"]: w["generation_requests"] for w in requests.get(f"{server.url}/workers").json()["ready"]}
    answered = [server.infer(["Hi"], max_tokens=2, ignore_eos=True) for _ in range(6)]
    requests.get(f"{server.url}/health")  # not a generation: not counted
    after = {w["pid"]: w["generation_requests"] for w in requests.get(f"{server.url}/workers").json()["ready"]}
    assert after.keys() == before.keys() and len(answered) == 6
    assert sum(after.values()) - sum(before.values()) == 6


def test_access_line_per_request_with_the_clients_request_id(server):
    response = requests.post(f"{server.url}/infer", headers={"X-Request-Id": "eval-run-42"},
                             json={"instances": ["Hi"], "params": {"max_tokens": 3, "ignore_eos": True}})
    assert response.headers["X-Request-Id"] == "eval-run-42"
    deadline = time.monotonic() + 10
    while '"eval-run-42"' not in server.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    line = next(entry for entry in server.log().splitlines() if '"eval-run-42"' in entry)
    record = json.loads(line)
    assert record["route"] == "/infer" and record["status"] == 200
    assert record["generated_tokens"] == 3 and record["prompt_tokens"] >= 1
    assert 0 < record["time_to_first_token_s"] <= record["total_s"]


def test_a_request_without_an_id_gets_one(server):
    first = requests.get(f"{server.url}/health").headers["X-Request-Id"]
    assert len(first) == 32 and first != requests.get(f"{server.url}/health").headers["X-Request-Id"]


def test_a_dead_workers_gauges_disappear(server):
    victim = sorted(server.slices)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the killed worker's gauges are still exported"
        try:
            workers = {s.labels["worker"] for s in scrape_metrics(server)["llm_worker_ready"]}
        except requests.ConnectionError:
            workers = {str(victim)}
        if str(victim) not in workers:
            break
        time.sleep(0.3)
    server.slices = server.wait_until_ready(workers=2)
