"""End to end: start_gunicorn.sh starts real gunicorn with 2 CPU workers serving the embedded model over HTTP.

Answers are checked against the same model run directly with transformers in this process: greedy texts must be
equal, and prompt log-probabilities equal within 1e-4 nats (both run in float32, the CPU default).
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import direct_prompt_logprobs, plain_generate
from test_docs import documented_examples

LOGPROB_TOLERANCE = 1e-4
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:\n",
    "1, 2, 3, 4,",
    "Question: what is 7 times 8?\nAnswer:",
]


@pytest.fixture(scope="module")
def server(start_server):
    # More threads than gunicorn's default connection limit (1000): keep-alive must still work (below).
    server = start_server("--cpu-workers", "2", "--threads", "1200")
    server.slices = server.wait_until_ready(workers=2)
    return server


def test_a_client_keeps_its_connection_between_requests(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        sockets = []
        for _ in range(3):
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            assert response.status == 200 and response.getheader("Connection", "").lower() != "close"
            sockets.append(connection.sock)
        assert sockets[0] is not None and sockets.count(sockets[0]) == 3  # one connection served all three
    finally:
        connection.close()


def test_two_cpu_workers_hold_distinct_slices(server):
    assert sorted(server.slices.values()) == ["cpu0", "cpu1"]


def test_greedy_answers_equal_plain_generate(server, reference_model):
    expected = [plain_generate(reference_model, prompt, max_new_tokens=24) for prompt in PROMPTS]
    assert server.infer(PROMPTS, temperature=0, max_tokens=24) == expected


@pytest.mark.parametrize("example", documented_examples(), ids=lambda example: example.where)
def test_documented_examples_answer_what_the_docs_show(server, example):
    # the body as curl's -d sends it
    response = requests.post(f"{server.url}{example.path}", data=example.raw.encode(), timeout=300,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    content_type = response.headers["Content-Type"]
    expected = example.expected(content_type)
    # An example of a refusal shows the error body, whose code is the status
    refusal = isinstance(expected, dict) and "error" in expected
    assert response.status_code == (expected["error"]["code"] if refusal else 200), response.text
    answer = response.json() if content_type.startswith("application/json") else response.text
    assert answer == expected, \
        f"{example.where} shows {example.shown!r}; the server answers {response.text!r}"


def test_prompt_logprobs_equal_direct_computation(server, reference_model):
    answers = server.infer(PROMPTS, prompt_logprobs=0)
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        direct = direct_prompt_logprobs(reference_model, prompt)
        assert len(answer) == len(direct)
        assert torch.allclose(torch.tensor(answer), direct, atol=LOGPROB_TOLERANCE, rtol=0)


def test_eight_concurrent_clients_are_all_answered_as_if_alone(server):
    prompts = [f"Count from {i}: {i}, {i + 1}," for i in range(8)]
    alone = [server.infer([prompt], temperature=0, max_tokens=12)[0] for prompt in prompts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda p: server.infer([p], temperature=0, max_tokens=12)[0], prompts))
    assert together == alone
    assert all(text for text in together)


def test_n_gives_a_list_per_instance_and_a_seed_repeats_it(server):
    first = server.infer(PROMPTS[:2], n=3, seed=7, temperature=1.0, max_tokens=8)
    assert [len(choices) for choices in first] == [3, 3]
    assert server.infer(PROMPTS[:2], n=3, seed=7, temperature=1.0, max_tokens=8) == first


def test_stop_string_ends_the_answer_before_it(server):
    unstopped = server.infer(["1, 2, 3, 4,"], temperature=0, max_tokens=16)[0]
    assert " 6" in unstopped
    assert server.infer(["1, 2, 3, 4,"], temperature=0, max_tokens=16, stop=[" 6"])[0] == unstopped.split(" 6")[0]


def test_max_tokens_bounds_the_answer(server, reference_model):
    tokenizer, _ = reference_model
    text = server.infer(["Once upon a time"], temperature=0, max_tokens=5, ignore_eos=True)[0]
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 6


def test_ignore_eos_generates_past_the_models_end_of_sequence(server):
    """The model ends this answer with EOS after about 30 tokens; with ignore_eos it goes on to max_tokens, and the
    answer comes back (generate() once stopped at EOS by itself, leaving the stream open: the client hung)."""
    prompt = "The capital of France is"
    natural = post_completion(server, prompt, max_tokens=48)
    assert natural["choices"][0]["finish_reason"] == "stop" and natural["usage"]["completion_tokens"] < 48
    forced = post_completion(server, prompt, max_tokens=48, ignore_eos=True)
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 48
    assert forced["choices"][0]["text"].startswith(natural["choices"][0]["text"])


def post_completion(server, prompt: str, **params) -> dict:
    response = requests.post(f"{server.url}/v1/completions", json={"prompt": prompt, "temperature": 0, **params},
                             timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_response_names_its_worker_and_slice(server):
    response = requests.post(f"{server.url}/infer", json={"instances": ["Hi"], "params": {"max_tokens": 1}})
    assert server.slices[int(response.headers["X-Worker-Pid"])] == response.headers["X-GPU-Slice"]


def test_unknown_params_keys_are_ignored_with_a_warning(server):
    # UltraEval's own key is unknown; vLLM's best_of and use_beam_search at their defaults ask for nothing
    answer = server.infer(["Hi"], max_tokens=2, sampling_num=3, best_of=1, use_beam_search=False)
    assert isinstance(answer[0], str)
    assert "ignoring unknown key 'sampling_num'" in server.log()
    assert "ignoring unknown key 'best_of'" not in server.log()


def test_killed_worker_is_replaced_on_its_slice_and_the_other_keeps_its_own(server):
    victim, survivor = sorted(server.slices)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while victim in server.worker_pids() or len(server.worker_pids()) < 2:
        assert time.monotonic() < deadline, "gunicorn did not replace the killed worker"
        time.sleep(0.2)
    now = server.wait_until_ready(workers=2)
    replacement = next(pid for pid in now if pid != survivor)
    assert now[replacement] == server.slices[victim]
    assert now[survivor] == server.slices[survivor]
    answers = {}
    while len(answers) < 2:  # both workers answer generation requests again
        assert time.monotonic() < deadline
        response = requests.post(f"{server.url}/infer", json={"instances": ["Hi"], "params": {"max_tokens": 2}})
        assert response.status_code == 200
        answers[int(response.headers["X-Worker-Pid"])] = response.json()
    assert set(answers) == {replacement, survivor}
    server.slices = now
