"""vLLM's token controls (`logit_bias`, `allowed_token_ids`, `bad_words`, `min_tokens`) and `prompt_logprobs` on
/v1/completions, end to end on BOTH engines and in-process on the transformers engine's batching paths.

One real server per engine (1 CPU worker, started through start_gunicorn.sh), over real HTTP: a bias of -100 on the
greedy first token gives the second likeliest instead, +100 on a token makes every token it; allowed ids restrict
every sampled token; bad words keep a word (one token, and two) out of a greedy answer that otherwise holds it, as
plain transformers `generate` with the same banned sequences does; min_tokens keeps a greedy answer going past its
end-of-sequence token; streamed answers equal whole ones; token ids outside the vocabulary are a 400 naming them.
`prompt_logprobs` come in vLLM's shape and equal one direct forward pass of the model on both engines, within the
scoring tests' float32 tolerance.

In-process, on the embedded model: the slot path and transformers' continuous batching (through the engine with
`--batching continuous`), each beside an uncontrolled row in the same steps, and the batched-generate path apply each
control.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from conftest import FLOAT32_SCORING, continuous_steps, plain_generate

HTTP_TIMEOUT = 120
PROMPT = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: 2018-01-22 ..."
SCORED = "Question: Which metal is liquid at room temperature?\nAnswer: mercury"

pytestmark = [pytest.mark.timeout(480), pytest.mark.usefixtures("server_alive")]


@pytest.fixture(scope="module")
def tokenizer(reference_model):
    return reference_model[0]


def first_token_logprobs(reference_model, prompt: str) -> torch.Tensor:
    """log P(next token | prompt) over the vocabulary, from plain transformers."""
    tokenizer, model = reference_model
    with torch.inference_mode():
        return torch.log_softmax(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].float(), dim=-1)


def generate_with_bad_words(reference_model, prompt: str, words: list[str], max_new_tokens: int) -> str:
    """Plain greedy `generate` with vLLM's banned token sequences for `words` (transformers' own processor)."""
    from gunicorn_llm.engines.token_controls import bad_words_token_ids

    tokenizer, model = reference_model
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                bad_words_ids=bad_words_token_ids(tokenizer, words))
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# -- over HTTP, both engines ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(engine_server):
    return engine_server


def completion(server, **body) -> dict:
    response = requests.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body},
                             timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def streamed_text(server, route: str, body: dict) -> str:
    response = requests.post(f"{server.url}{route}", json={**body, "stream": True}, timeout=HTTP_TIMEOUT, stream=True)
    assert response.status_code == 200, response.text
    text = ""
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            event = json.loads(line.removeprefix(b"data: "))
            assert "error" not in event, event
            for choice in event["choices"]:
                text += choice["delta"].get("content") or "" if "delta" in choice else choice["text"]
    return text


def test_logit_bias_bans_the_greedy_token_and_forces_another(server, reference_model, tokenizer):
    likeliest = first_token_logprobs(reference_model, PROMPT).topk(2).indices.tolist()
    banned = completion(server, max_tokens=1, logit_bias={str(likeliest[0]): -100}, logprobs=0)
    assert banned["logprobs"]["tokens"] == [tokenizer.decode([likeliest[1]])]
    forced_id = tokenizer.encode(" London", add_special_tokens=False)[0]
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 4, "logit_bias": {str(forced_id): 100}}
    forced = completion(server, **{key: value for key, value in body.items() if key != "prompt"})
    assert forced["text"] == tokenizer.decode([forced_id] * 4)
    assert streamed_text(server, "/v1/completions", body) == forced["text"]


def test_allowed_token_ids_restrict_every_sampled_token(server, tokenizer):
    allowed = tokenizer.encode(" yes no maybe 1 2 3", add_special_tokens=False)
    pieces = {tokenizer.decode([token]) for token in allowed}
    choice = completion(server, max_tokens=12, temperature=1.0, seed=3, allowed_token_ids=allowed, logprobs=0,
                        ignore_eos=True)
    assert len(choice["logprobs"]["tokens"]) == 12 and set(choice["logprobs"]["tokens"]) <= pieces, choice
    answer = requests.post(f"{server.url}/infer", json={"instances": [PROMPT], "params": {
        "max_tokens": 8, "temperature": 0, "allowed_token_ids": allowed[:2], "ignore_eos": True}}, timeout=HTTP_TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert set(tokenizer.encode(answer.json()[0], add_special_tokens=False)) <= set(allowed[:2])


@pytest.mark.parametrize("words", [["Paris"], ["The answer"]])
def test_bad_words_keep_a_word_out_of_a_greedy_answer(server, reference_model, words):
    plain = plain_generate(reference_model, PROMPT, max_new_tokens=16)
    assert words[0] in plain  # the greedy answer holds the word: banning it must change the answer
    expected = generate_with_bad_words(reference_model, PROMPT, words, max_new_tokens=16)
    assert words[0] not in expected
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 16, "bad_words": words}
    assert completion(server, **{key: value for key, value in body.items() if key != "prompt"})["text"] == expected
    assert streamed_text(server, "/v1/completions", body) == expected


def test_bad_words_on_chat_completions(server):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
            "max_tokens": 24}
    plain = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT).json()
    assert "Paris" in plain["choices"][0]["message"]["content"]
    banned = requests.post(f"{server.url}/v1/chat/completions", json={**body, "bad_words": ["Paris"]},
                           timeout=HTTP_TIMEOUT).json()
    text = banned["choices"][0]["message"]["content"]
    assert "Paris" not in text and text != plain["choices"][0]["message"]["content"]
    assert streamed_text(server, "/v1/chat/completions", {**body, "bad_words": ["Paris"]}) == text


def test_min_tokens_keeps_a_greedy_answer_going_past_its_end(server):
    natural = completion(server, max_tokens=48, logprobs=0)
    ended_at = len(natural["logprobs"]["tokens"])
    assert natural["finish_reason"] == "stop" and ended_at < 40, natural  # the model ends it with EOS early
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 48, "min_tokens": 40}
    held = requests.post(f"{server.url}/v1/completions", json=body, timeout=HTTP_TIMEOUT).json()
    assert held["usage"]["completion_tokens"] >= 40, held
    assert held["choices"][0]["text"].startswith(natural["text"])
    assert streamed_text(server, "/v1/completions", body) == held["choices"][0]["text"]


def test_prompt_logprobs_in_vllms_shape_equal_a_direct_forward_pass(server, reference_model, tokenizer):
    top = 2
    body = {"prompt": SCORED, "max_tokens": 1, "temperature": 1.0, "seed": 1, "prompt_logprobs": top, "n": 2}
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    first, second = (choice["prompt_logprobs"] for choice in response.json()["choices"])
    assert first == second  # every choice of a prompt carries them, as in vLLM
    ids = tokenizer(SCORED)["input_ids"]
    assert first[0] is None and len(first) == len(ids)
    _, model = reference_model
    with torch.inference_mode():
        direct = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for position, (token, entry) in enumerate(zip(ids[1:], first[1:], strict=True)):
        want = direct[position]
        assert str(token) in entry and len(entry) in (top, top + 1), entry
        for key, value in entry.items():
            assert value["decoded_token"] == tokenizer.decode([int(key)])
            assert value["logprob"] == pytest.approx(want[int(key)].item(), **FLOAT32_SCORING), (position, key)
        by_rank = {value["rank"]: value["logprob"] for value in entry.values()}
        assert [by_rank[rank] for rank in range(1, top + 1)] == pytest.approx(want.topk(top).values.tolist(),
                                                                              **FLOAT32_SCORING)
        # the prompt token's rank: 1 + the tokens likelier than it (ties within the tolerance either way)
        value = want[token].item()
        likelier = int((want > value + FLOAT32_SCORING["abs"]).sum())
        as_likely = int((want >= value - FLOAT32_SCORING["abs"]).sum())
        assert likelier + 1 <= entry[str(token)]["rank"] <= as_likely, (position, entry)


def documented_prompt_logprobs() -> tuple[dict, list]:
    """docs/api.md's prompt_logprobs example: the body its curl line sends, and the prompt_logprobs it shows."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    line = next(line for line in page.splitlines() if line.startswith("curl ") and '"prompt_logprobs"' in line)
    words = shlex.split(line)
    shown = re.search(r"```json\n(.*?)\n```", page[page.index(line):], re.DOTALL).group(1)
    return json.loads(words[words.index("-d") + 1]), json.loads(shown)["prompt_logprobs"]


def test_the_documented_prompt_logprobs_example_answers_what_the_docs_show(server):
    body, shown = documented_prompt_logprobs()
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["prompt_logprobs"]
    assert answer[0] is None and shown[0] is None and len(answer) == len(shown)
    for got, want in zip(answer[1:], shown[1:], strict=True):
        assert got.keys() == want.keys()
        for token, entry in want.items():
            assert got[token]["decoded_token"] == entry["decoded_token"]
            # a tail token's rank may move past a few near-equal ones with another engine's rounding
            assert abs(got[token]["rank"] - entry["rank"]) <= entry["rank"] // 100, (token, got[token])
            # the page rounds to 4 decimals
            assert got[token]["logprob"] == pytest.approx(entry["logprob"], abs=FLOAT32_SCORING["abs"] + 5e-5)


def test_prompt_logprobs_and_token_controls_are_refused_where_they_cannot_apply(server, tokenizer):
    outside = len(tokenizer) + 7
    cases = [
        ({"logit_bias": {str(outside): 5}}, "logit_bias", str(outside)),
        ({"allowed_token_ids": [1, outside]}, "allowed_token_ids", str(outside)),
        ({"bad_words": ["   "]}, "bad_words", "no token"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "max_tokens"),
    ]
    for fields, param, named in cases:
        response = requests.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, **fields},
                                 timeout=HTTP_TIMEOUT)
        assert response.status_code == 400, (fields, response.text)
        error = response.json()["error"]
        assert error["param"] == param and named in error["message"], error
    response = requests.post(f"{server.url}/infer", json={"instances": [PROMPT], "params": {
        "logit_bias": {str(outside): 1}}}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["param"] == "params.logit_bias"


# -- in-process: the transformers engine's slot, continuous and batched-generate paths --------------------------------


def controlled_cases(tokenizer, reference_model) -> dict[str, tuple[dict, object]]:
    """Per control: the params (greedy, 12 tokens, EOS ignored) and a check of the tokens it generates."""
    from gunicorn_llm.engines.token_controls import bad_words_token_ids

    likeliest = first_token_logprobs(reference_model, PROMPT).topk(2).indices.tolist()
    allowed = tokenizer.encode(" yes no 1 2", add_special_tokens=False)
    paris = bad_words_token_ids(tokenizer, ["Paris"])
    first = likeliest[0]
    return {
        "logit_bias": ({"logit_bias": {str(first): -100}}, lambda tokens: tokens[0] == likeliest[1]),
        "allowed_token_ids": ({"allowed_token_ids": allowed}, lambda tokens: set(tokens) <= set(allowed)),
        "bad_words": ({"bad_words": ["Paris"]},
                      lambda tokens: not any(word[0] in tokens for word in paris) and "Paris" not in
                      tokenizer.decode(tokens)),
        # the greedy first token made a stop token: without min_tokens the answer would be that one token
        "min_tokens": ({"min_tokens": 5, "stop_token_ids": [first]},
                       lambda tokens: first not in tokens[:5] and len(tokens) > 5),
    }


def params_for(**fields):
    from gunicorn_llm.request_schema import SamplingParams

    return SamplingParams.model_validate({"temperature": 0.0, "ignore_eos": True, "max_tokens": 12, **fields})


def controls_for(params, tokenizer, stop_ids):
    from gunicorn_llm.engines.token_controls import TokenControls

    return TokenControls.of(params, tokenizer, stop_ids, torch.device("cpu"))


def tokens_of(stream) -> list[int]:
    tokens = []
    for update in stream.updates(deadline=time.monotonic() + 120):
        tokens.extend(update.token_ids)
    return tokens


@pytest.mark.parametrize("control", ["logit_bias", "allowed_token_ids", "bad_words", "min_tokens"])
def test_the_slot_path_applies_a_control_beside_an_uncontrolled_row(reference_model, tokenizer, control):
    from gunicorn_llm.engines.transformers_slots import SlotBatching

    fields, check = controlled_cases(tokenizer, reference_model)[control]
    _, model = reference_model
    steps: list[tuple] = []
    built: list[SlotBatching] = []
    engine = SlotBatching(model, 2, 128, cache_bytes=2**28, cuda_graphs=False, on_death=print,
                          on_step=lambda: steps.append(tuple(s.params for s in built[0]._running)))
    built.append(engine)
    ids = tokenizer(PROMPT)["input_ids"]
    plain, controlled = params_for(), params_for(**fields)
    stop_ids = frozenset(controlled.stop_token_ids or ())
    with engine.paused():  # prefilled and decoded together
        streams = [engine.start(ids, plain, frozenset()),
                   engine.start(ids, controlled, stop_ids, controls_for(controlled, tokenizer, stop_ids))]
    plain_tokens, controlled_tokens = (tokens_of(stream) for stream in streams)
    assert any(set(step) == {plain, controlled} for step in steps), "they never shared a decode step"
    assert tokenizer.decode(plain_tokens) == plain_generate(reference_model, PROMPT, max_new_tokens=12)
    assert check(controlled_tokens), tokenizer.decode(controlled_tokens)


@pytest.mark.parametrize("control", ["logit_bias", "allowed_token_ids", "bad_words", "min_tokens"])
def test_the_continuous_path_applies_a_control_beside_an_uncontrolled_row(continuous_engine, reference_model,
                                                                          tokenizer, control, monkeypatch):
    from gunicorn_llm.ops import metrics

    fields, check = controlled_cases(tokenizer, reference_model)[control]
    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    steps = continuous_steps(continuous_engine, monkeypatch)
    ids = tokenizer(PROMPT)["input_ids"]
    with continuous_engine.paths[0].paused():  # they join the manager's batch together
        streams = [continuous_engine.start(ids, params_for()), continuous_engine.start(ids, params_for(**fields))]
    plain_tokens, controlled_tokens = (tokens_of(stream) for stream in streams)
    assert paths == ["continuous", "continuous"]
    assert {"plain", "controlled"} in steps, "they never shared a step"
    assert tokenizer.decode(plain_tokens) == plain_generate(reference_model, PROMPT, max_new_tokens=12)
    assert check(controlled_tokens), tokenizer.decode(controlled_tokens)


@pytest.mark.parametrize("control", ["logit_bias", "allowed_token_ids", "bad_words", "min_tokens"])
def test_the_generate_path_applies_a_control_to_every_row(reference_model, tokenizer, control, monkeypatch):
    from gunicorn_llm.engines.base import GenerationStream
    from gunicorn_llm.engines.transformers_generate import BatchedGenerate, GenerateJob

    fields, check = controlled_cases(tokenizer, reference_model)[control]
    _, model = reference_model
    padding_tokenizer = copy.deepcopy(tokenizer)
    padding_tokenizer.padding_side = "left"
    with monkeypatch.context() as held:  # its batching thread starts once the job waits
        held.setattr(threading.Thread, "start", lambda thread: None)
        batched = BatchedGenerate(model, padding_tokenizer, 8, beside=None, on_death=print, on_step=lambda: None)
    controlled = params_for(n=2, **fields)
    stop_ids = frozenset(controlled.stop_token_ids or ())
    stream = GenerationStream(2, abort=lambda: None)
    batched._jobs.put(GenerateJob(tokenizer(PROMPT)["input_ids"], controlled, stop_ids, stream,
                                  controls_for(controlled, tokenizer, stop_ids)))
    threading.Thread(target=batched._run_batches, name="batcher", daemon=True).start()
    per_choice: dict[int, list[int]] = {0: [], 1: []}
    for update in stream.updates(deadline=time.monotonic() + 120):
        per_choice[update.choice].extend(update.token_ids)
    for tokens in per_choice.values():
        assert check(tokens), tokenizer.decode(tokens)
