"""End to end on both continuous-batching paths of the transformers engine, run on CPU.

A real server started with `--batching slots` (this server's own, the default on GPU; eager steps on CPU), then one
with `--batching continuous` (transformers' manager); requests they cannot serve (seeds, stop strings, penalties,
prompt scoring) take the batched-generate path in the same worker while they run. Structured-output and
token-controlled requests are served by the server's own batching path beside plain ones, as /metrics counts.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import metric_value, plain_generate, scrape_metrics

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Question: what is 7 times 8?\nAnswer:"]
PHONE = "[0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module", params=["slots", "continuous"])
def server(start_server, request):
    server = start_server("--cpu-workers", "1", "--batching", request.param, "--max-model-len", "128")
    server.wait_until_ready(workers=1)
    server.batching = request.param
    return server


def test_ready_reports_the_batching(server):
    ready = requests.get(f"{server.url}/ready").json()
    assert ready["batching"] == server.batching
    if server.batching == "slots":  # the default: 128 slots per worker (128-token slots fit in its 1 GiB on CPU)
        assert ready["slots"] == 128


def test_greedy_answers_equal_plain_generate(server, reference_model):
    expected = [plain_generate(reference_model, prompt, max_new_tokens=20) for prompt in PROMPTS]
    assert server.infer(PROMPTS, temperature=0, max_tokens=20) == expected


def test_sampling_gives_n_texts_of_bounded_length(server, reference_model):
    tokenizer, _ = reference_model
    answers = server.infer(PROMPTS[:2], n=3, temperature=1.0, top_p=0.9, top_k=40, max_tokens=6, ignore_eos=True)
    assert [len(choices) for choices in answers] == [3, 3]
    for text in (text for choices in answers for text in choices):
        assert 1 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 7


def test_mixed_concurrent_requests_take_both_paths_and_are_all_answered(server, reference_model):
    greedy = {prompt: plain_generate(reference_model, prompt, max_new_tokens=12) for prompt in PROMPTS}
    seeded = server.infer([PROMPTS[0]], seed=11, max_tokens=8)  # batched-generate path

    def send(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            return "seeded", server.infer([PROMPTS[0]], seed=11, max_tokens=8)
        if i % 3 == 1:
            return ("greedy", prompt), server.infer([prompt], temperature=0, max_tokens=12)
        return "stop", server.infer([prompt], temperature=0, max_tokens=12, stop=["\n"])

    with ThreadPoolExecutor(max_workers=9) as pool:
        results = list(pool.map(send, range(9)))
    for kind, answer in results:
        if kind == "seeded":
            assert answer == seeded
        elif kind == "stop":
            assert "\n" not in answer[0]
        else:
            assert answer == [greedy[kind[1]]]


def test_prompt_logprobs_still_served(server):
    answer = server.infer(["The cat sat on the mat"], prompt_logprobs=0)
    assert len(answer[0]) >= 4 and all(value <= 0 for value in answer[0])


def test_constrained_and_controlled_requests_take_the_servers_batching_path_beside_a_plain_one(server,
                                                                                               reference_model):
    tokenizer, _ = reference_model
    paris = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    greedy = {"temperature": 0, "max_tokens": 12}
    sent = {  # kind: prompt, params
        "plain": (PROMPTS[0], greedy),
        "constrained": ("A phone number:", {**greedy, "structured_outputs": {"regex": PHONE}}),
        "controlled": (PROMPTS[0], {**greedy, "logit_bias": {str(paris): -100}}),
    }
    before = scrape_metrics(server).get("llm_engine_path", [])
    with ThreadPoolExecutor(max_workers=len(sent)) as pool:
        answers = dict(zip(sent, pool.map(lambda kind: server.infer([sent[kind][0]], **sent[kind][1])[0], sent),
                           strict=True))
    after = scrape_metrics(server)["llm_engine_path"]
    assert answers["plain"] == plain_generate(reference_model, PROMPTS[0], max_new_tokens=12)
    assert re.fullmatch(PHONE, answers["constrained"]), answers
    assert "Paris" in answers["plain"] and "Paris" not in answers["controlled"], answers
    for path, prompts in ((server.batching, 3), ("generate", 0)):
        assert metric_value(after, "llm_engine_path_total", path=path) - \
            metric_value(before, "llm_engine_path_total", path=path) == prompts, path
