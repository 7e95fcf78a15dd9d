"""End to end on the vLLM engine (vLLM's CPU build): start_gunicorn.sh --infer_type vllm, 2 CPU workers, real HTTP.

Same contract as the transformers engine, checked against the same reference: greedy texts equal to plain
transformers `generate`, and prompt log-probabilities within 5e-4 nats of a direct transformers computation (both
in float32, the CPU default; measured difference about 5e-5). The transformers engine is held to 1e-4 of the
same reference, so the two engines agree within 6e-4.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import torch

from conftest import direct_prompt_logprobs, plain_generate, took_deprecated_vllm_prompts

LOGPROB_TOLERANCE = 5e-4
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:\n",
    "1, 2, 3, 4,",
    "Question: what is 7 times 8?\nAnswer:",
]


@pytest.fixture(scope="module")
def server(start_server):
    # Eager mode and a 1 GiB KV cache per worker keep start-up and memory small on CI's machine.
    # --stream-interval 3: streams come in chunks of 3 tokens after the first (vLLM builds its outputs that way).
    server = start_server("--infer_type", "vLLM", "--cpu-workers", "2", "--stream-interval", "3",
                          env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    server.seen_while_loading = health_and_readiness_until_ready(server)
    server.slices = server.wait_until_ready(workers=2, timeout_s=400)
    return server


def health_and_readiness_until_ready(server) -> set[tuple[int, int]]:
    """(/health status, /ready status) pairs from one worker while vLLM loads (it takes tens of seconds)."""
    seen = set()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and (200, 200) not in seen:
        try:
            with requests.Session() as session:  # one connection: both answers come from the same worker
                seen.add((session.get(f"{server.url}/health", timeout=10).status_code,
                          session.get(f"{server.url}/ready", timeout=10).status_code))
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return seen


def test_health_answers_while_the_model_loads_and_ready_waits_for_it(server):
    assert (200, 503) in server.seen_while_loading
    assert (200, 200) in server.seen_while_loading


def descendants(server) -> set[int]:
    return {child.pid for child in psutil.Process(server.process.pid).children(recursive=True)}


def test_workers_serve_vllm_on_distinct_slices(server):
    assert sorted(server.slices.values()) == ["cpu0", "cpu1"]
    assert requests.get(f"{server.url}/ready").json()["engine"] == "vllm"


def test_greedy_answers_equal_plain_generate(server, reference_model):
    expected = [plain_generate(reference_model, prompt, max_new_tokens=24) for prompt in PROMPTS]
    assert server.infer(PROMPTS, temperature=0, max_tokens=24) == expected
    assert not took_deprecated_vllm_prompts(server)


def test_prompt_logprobs_equal_direct_computation(server, reference_model):
    for prompt, answer in zip(PROMPTS, server.infer(PROMPTS, prompt_logprobs=0), strict=True):
        direct = direct_prompt_logprobs(reference_model, prompt)
        assert len(answer) == len(direct)
        assert torch.allclose(torch.tensor(answer), direct, atol=LOGPROB_TOLERANCE, rtol=0)


def test_eight_concurrent_clients_are_all_answered_as_if_alone(server):
    prompts = [f"Count from {i}: {i}, {i + 1}," for i in range(8)]
    alone = [server.infer([prompt], temperature=0, max_tokens=12)[0] for prompt in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda p: server.infer([p], temperature=0, max_tokens=12)[0], prompts))
    assert together == alone


def test_sampling_with_a_seed_is_reproducible(server):
    first = server.infer(PROMPTS[:2], n=3, seed=7, temperature=1.0, max_tokens=8)
    assert [len(choices) for choices in first] == [3, 3]
    assert server.infer(PROMPTS[:2], n=3, seed=7, temperature=1.0, max_tokens=8) == first


def test_a_stream_comes_in_chunks_of_the_stream_interval_and_says_what_the_whole_answer_says(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    whole = requests.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    streamed = requests.post(f"{server.url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120)
    chunks = [json.loads(line.removeprefix(b"data: ")) for line in streamed.iter_lines()
              if line.startswith(b"data: {")]
    with_tokens = [chunk["choices"][0] for chunk in chunks if chunk["choices"] and chunk["choices"][0]["logprobs"]]
    assert [len(choice["logprobs"]["tokens"]) for choice in with_tokens] == [1, 3, 3, 3]
    assert "".join(choice["text"] for choice in with_tokens) == whole["text"]
    assert sum((choice["logprobs"]["token_logprobs"] for choice in with_tokens), []) == pytest.approx(
        whole["logprobs"]["token_logprobs"], abs=1e-5)


def test_stop_strings_and_validation_behave_as_on_transformers(server):
    unstopped = server.infer(["1, 2, 3, 4,"], temperature=0, max_tokens=16)[0]
    assert server.infer(["1, 2, 3, 4,"], temperature=0, max_tokens=16, stop=[" 6"])[0] == unstopped.split(" 6")[0]
    response = requests.post(f"{server.url}/infer", json={"instances": ["hi"], "params": {"top_p": 1.5}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "params.top_p"


def test_killed_worker_leaves_no_engine_process_and_is_replaced(server):
    before = descendants(server)
    victim, survivor = sorted(server.slices)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 400
    while victim in server.worker_pids() or len(server.worker_pids()) < 2:
        assert time.monotonic() < deadline, "gunicorn did not replace the killed worker"
        time.sleep(0.2)
    now = server.wait_until_ready(workers=2, timeout_s=400)
    replacement = next(pid for pid in now if pid != survivor)
    assert now[replacement] == server.slices[victim] and now[survivor] == server.slices[survivor]
    # Everything the server ran before is still its own or gone: nothing was orphaned by the kill.
    leftovers = [pid for pid in before - {victim} if psutil.pid_exists(pid) and pid not in descendants(server)]
    assert leftovers == []
    assert len(descendants(server)) == len(before)
    assert server.infer(["Hi"], temperature=0, max_tokens=2)
    server.slices = now


def test_sigterm_of_the_master_leaves_no_process(server):
    tree = descendants(server) | {server.process.pid}
    os.kill(server.process.pid, signal.SIGTERM)  # the launcher exec'd gunicorn: this pid is the master
    assert server.process.wait(timeout=120) == 0
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in tree):
        assert time.monotonic() < deadline, "processes outlived the server"
        time.sleep(0.2)
