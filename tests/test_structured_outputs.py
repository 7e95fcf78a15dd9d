"""Structured outputs (`response_format`, vLLM's `structured_outputs`), end to end on BOTH engines and in-process.

One real server per engine (1 CPU worker, started through start_gunicorn.sh) is asked over real HTTP, also through
the official `openai` SDK's `parse()` with a pydantic model: json_schema answers validate against their schema
(`jsonschema`), json_object answers are JSON objects, `choice` answers are one of the choices, `regex` answers match,
`grammar` answers are sentences of the grammar, streamed answers concatenate to the whole one, and a constraint
that cannot compile is a 400 naming its field, before anything runs. A constrained and an unconstrained request
served together leave the unconstrained answer as it is alone.

In-process, on the embedded model: the slot path (transformers_slots.py), transformers' continuous batching
(transformers_continuous.py, through the engine with `--batching continuous`: a regex, a choice and a JSON schema)
and the batched-generate path (transformers_generate.py) mask a constrained row while an unconstrained row in the
same batch (one decode step, one `generate` call) still equals plain greedy `generate` token for token.

The embedded model is small: prompts ask for JSON and schemas have small bounded fields, so that greedy answers end
well within max_tokens.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from typing import Literal

import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

from conftest import continuous_steps, openai_client, plain_generate

MODEL = "SmolLM2-135M-Instruct"
HTTP_TIMEOUT = 120
JSON_QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
JSON_PROMPT = "The capital of France, as JSON with the keys city and continent: "
CHOICES = ["yes", "no", "maybe"]
PHONE = r"[0-9]{3}-[0-9]{4}"
GRAMMAR = 'root ::= "The answer is " ("red" | "green" | "blue") "."'

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("server_alive")]


class Capital(BaseModel):
    city: str = Field(max_length=20)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


SCHEMA = Capital.model_json_schema()
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(engine_server):
    return engine_server


@pytest.fixture
def client(server):
    return openai_client(server, HTTP_TIMEOUT)


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(server.url + route, json=body, timeout=HTTP_TIMEOUT)


def answer_of(server, route: str, body: dict) -> list[str]:
    """Each choice's text of a whole answer (a 200 required)."""
    response = post(server, route, body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    return [choice["message"]["content"] if "message" in choice else choice["text"] for choice in choices]


def streamed_answer_of(server, route: str, body: dict) -> list[str]:
    """Each choice's text of a streamed answer, its deltas concatenated."""
    response = requests.post(server.url + route, json={**body, "stream": True}, timeout=HTTP_TIMEOUT, stream=True)
    assert response.status_code == 200, response.text
    texts: dict[int, str] = {}
    for line in response.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line.removeprefix(b"data: "))
        assert "error" not in event, event
        for choice in event["choices"]:
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return [texts[index] for index in sorted(texts)]


def running(server) -> int:
    return requests.get(f"{server.url}/ready", timeout=10).json()["running"]


# -- over HTTP, both engines ---------------------------------------------------------------------------------------


def test_the_sdks_parse_with_a_pydantic_model_gives_the_parsed_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=JSON_QUESTION, response_format=Capital,
                                               temperature=0, max_tokens=80)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Capital), message.content
    jsonschema.validate(json.loads(message.content), SCHEMA)


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/chat/completions", {"messages": JSON_QUESTION}),
    ("/v1/completions", {"prompt": JSON_PROMPT}),
])
def test_json_schema_answers_validate_whole_and_streamed_alike(server, route, body):
    body = {**body, "response_format": JSON_SCHEMA_FORMAT, "temperature": 0, "max_tokens": 80}
    whole = answer_of(server, route, body)
    assert streamed_answer_of(server, route, body) == whole
    jsonschema.validate(json.loads(whole[0]), SCHEMA)
    # vLLM's spelling of the same constraint gives the same answer
    vllm_body = {**body, "response_format": None, "structured_outputs": {"json": SCHEMA}}
    assert answer_of(server, route, vllm_body) == whole


def test_json_object_answers_are_json_objects(server):
    body = {"messages": JSON_QUESTION, "response_format": {"type": "json_object"}, "temperature": 0,
            "max_tokens": 80}
    assert isinstance(json.loads(answer_of(server, "/v1/chat/completions", body)[0]), dict)
    body = {**body, "response_format": None, "structured_outputs": {"json_object": True}}
    assert isinstance(json.loads(streamed_answer_of(server, "/v1/chat/completions", body)[0]), dict)


def test_choice_answers_are_one_of_the_choices_in_every_sample(server):
    body = {"prompt": "Is the sky blue? Answer:", "structured_outputs": {"choice": CHOICES}, "n": 3,
            "temperature": 1.0, "seed": 7, "max_tokens": 10}
    for answers in (answer_of(server, "/v1/completions", body), streamed_answer_of(server, "/v1/completions", body)):
        assert len(answers) == 3 and all(answer in CHOICES for answer in answers), answers


def test_regex_answers_match_and_a_grammar_is_followed_in_chat(server):
    body = {"prompt": "A phone number:", "structured_outputs": {"regex": PHONE}, "temperature": 0, "max_tokens": 20}
    answer = answer_of(server, "/v1/completions", body)[0]
    assert re.fullmatch(PHONE, answer), answer
    assert streamed_answer_of(server, "/v1/completions", body) == [answer]
    chat = {"messages": [{"role": "user", "content": "What colour is the sky?"}],
            "structured_outputs": {"grammar": GRAMMAR}, "temperature": 0, "max_tokens": 20}
    assert answer_of(server, "/v1/chat/completions", chat)[0] in {f"The answer is {c}." for c in ("red", "green",
                                                                                                    "blue")}


def test_infer_takes_structured_outputs_in_its_params(server):
    answers = server.infer(["Is the sky blue? Answer:"], structured_outputs={"choice": CHOICES}, temperature=0,
                           max_tokens=10)
    assert answers[0] in CHOICES


@pytest.mark.parametrize(("route", "fields", "param"), [
    ("/v1/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ("/v1/chat/completions", {"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs.json"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}},
     "response_format"),
    ("/v1/chat/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ("/v1/chat/completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format"),
])
def test_a_constraint_that_cannot_apply_is_a_400_naming_its_field(server, route, fields, param):
    body = {"prompt": "x"} if route == "/v1/completions" else {"messages": JSON_QUESTION}
    response = post(server, route, {**body, **fields, "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    assert running(server) == 0


def test_a_constrained_and_an_unconstrained_request_together_leave_the_unconstrained_answer_as_alone(
        server, reference_model):
    prompt = "The capital of France is"
    # no ignore_eos: vLLM lets a sequence run on unconstrained past its grammar's end-of-sequence then
    plain = {"prompt": prompt, "temperature": 0, "max_tokens": 12}
    constrained = {**plain, "structured_outputs": {"regex": PHONE}}
    answers: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda name=name, body=body: answers.__setitem__(
        name, answer_of(server, "/v1/completions", body))) for name, body in (("plain", plain),
                                                                                ("constrained", constrained))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers["plain"] == [plain_generate(reference_model, prompt, max_new_tokens=12)]
    assert re.fullmatch(PHONE, answers["constrained"][0]), answers


# -- in-process: the transformers engine's slot, continuous and batched-generate paths --------------------------------


@pytest.fixture(scope="module")
def grammars(reference_model):
    from gunicorn_llm.engines.grammars import Grammars

    tokenizer, model = reference_model
    return Grammars(tokenizer, model.get_output_embeddings().weight.shape[0], [tokenizer.eos_token_id])


def params_for(**fields):
    from gunicorn_llm.request_schema import SamplingParams

    return SamplingParams.model_validate({"temperature": 0.0, "ignore_eos": True, **fields})


def tokens_of(stream) -> tuple[list[int], str]:
    tokens, reason = [], None
    for update in stream.updates(deadline=time.monotonic() + 120):
        tokens.extend(update.token_ids)
        reason = update.finish_reason or reason
    return tokens, reason


def check_shared_batch_answers(tokenizer, reference_model, ids, plain, constrained):
    """The unconstrained row equals plain greedy generate; the constrained one matches the regex and ended there."""
    plain_tokens, plain_reason = plain
    constrained_tokens, constrained_reason = constrained
    expected = plain_generate(reference_model, tokenizer.decode(ids, skip_special_tokens=True), max_new_tokens=12)
    assert tokenizer.decode(plain_tokens) == expected and plain_reason == "length"
    text = tokenizer.decode(constrained_tokens, skip_special_tokens=True)
    assert re.fullmatch(PHONE, text) and constrained_reason == "stop", (text, constrained_reason)


def test_the_slot_path_masks_a_constrained_row_in_the_same_decode_step_as_an_unconstrained_one(
        reference_model, grammars):
    from gunicorn_llm.engines.transformers_slots import SlotBatching

    tokenizer, model = reference_model
    steps: list[tuple] = []
    built: list[SlotBatching] = []
    engine = SlotBatching(model, 2, 128, cache_bytes=2**28, cuda_graphs=False, on_death=print,
                          on_step=lambda: steps.append(tuple(s.params for s in built[0]._running)), grammars=grammars)
    built.append(engine)
    ids = tokenizer("The capital of France is")["input_ids"]
    plain, constrained = params_for(max_tokens=12), params_for(max_tokens=12, structured_outputs={"regex": PHONE})
    with engine.paused():  # prefilled and decoded together
        streams = [engine.start(ids, params, frozenset()) for params in (plain, constrained)]
    results = [tokens_of(stream) for stream in streams]
    assert any(set(step) == {plain, constrained} for step in steps), "they never shared a decode step"
    check_shared_batch_answers(tokenizer, reference_model, ids, *results)


def test_the_generate_path_masks_a_constrained_row_in_the_same_generate_call_as_an_unconstrained_one(
        reference_model, grammars, monkeypatch):
    from gunicorn_llm.engines.base import GenerationStream
    from gunicorn_llm.engines.transformers_generate import BatchedGenerate, GenerateJob

    tokenizer, model = reference_model
    padding_tokenizer = copy.deepcopy(tokenizer)
    padding_tokenizer.padding_side = "left"
    with monkeypatch.context() as held:  # its batching thread starts once both jobs wait: it takes them together
        held.setattr(threading.Thread, "start", lambda thread: None)
        batched = BatchedGenerate(model, padding_tokenizer, 8, beside=None, on_death=print, on_step=lambda: None,
                                  grammars=grammars)
    calls: list[int] = []
    real_generate_rows = batched._generate_rows
    monkeypatch.setattr(batched, "_generate_rows",
                        lambda rows, params: (calls.append(len(rows)), real_generate_rows(rows, params)))
    ids = tokenizer("The capital of France is")["input_ids"]
    plain, constrained = params_for(max_tokens=12), params_for(max_tokens=12, structured_outputs={"regex": PHONE})
    jobs = [GenerateJob(ids, params, frozenset(), GenerationStream(1, abort=lambda: None))
            for params in (plain, constrained)]
    for job in jobs:
        batched._jobs.put(job)
    threading.Thread(target=batched._run_batches, name="batcher", daemon=True).start()
    results = [tokens_of(job.stream) for job in jobs]
    assert calls == [2], "the two rows did not share one generate call"
    check_shared_batch_answers(tokenizer, reference_model, ids, *results)


CONTINUOUS_CONSTRAINTS = {  # prompt, constraint, whether an answer conforms
    "regex": ("The capital of France is", {"regex": PHONE}, lambda text: re.fullmatch(PHONE, text)),
    "choice": ("Is the sky blue? Answer:", {"choice": CHOICES}, lambda text: text in CHOICES),
    "json": (JSON_PROMPT, {"json": SCHEMA}, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
}


@pytest.mark.parametrize("kind", list(CONTINUOUS_CONSTRAINTS))
def test_the_continuous_path_masks_a_constrained_row_in_the_same_step_as_an_unconstrained_one(
        continuous_engine, reference_model, monkeypatch, kind):
    from gunicorn_llm.ops import metrics

    tokenizer, _ = reference_model
    prompt, constraint, conforms = CONTINUOUS_CONSTRAINTS[kind]
    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    steps = continuous_steps(continuous_engine, monkeypatch)
    plain_ids, constrained_ids = (tokenizer(text)["input_ids"] for text in ("The capital of France is", prompt))
    plain, constrained = params_for(max_tokens=12), params_for(max_tokens=80, structured_outputs=constraint)
    with continuous_engine.paths[0].paused():  # they join the manager's batch together
        streams = [continuous_engine.start(plain_ids, plain), continuous_engine.start(constrained_ids, constrained)]
    (plain_tokens, plain_reason), (constrained_tokens, constrained_reason) = (tokens_of(stream) for stream in streams)
    assert paths == ["continuous", "continuous"]
    assert {"plain", "constrained"} in steps, "they never shared a step"
    assert tokenizer.decode(plain_tokens) == plain_generate(reference_model, "The capital of France is", 12)
    assert plain_reason == "length"
    text = tokenizer.decode(constrained_tokens, skip_special_tokens=True)
    assert conforms(text) and constrained_reason == "stop", (text, constrained_reason)
    assert continuous_engine.running() == 0


def test_the_continuous_path_leaves_constrained_and_controlled_requests_to_generate_where_it_replays_graphs(
        continuous_engine, reference_model, monkeypatch):
    from transformers import ContinuousBatchingConfig

    from gunicorn_llm.engines.transformers_continuous import steps_on_the_host
    from gunicorn_llm.ops import metrics

    tokenizer, _ = reference_model
    assert steps_on_the_host(ContinuousBatchingConfig(use_cuda_graph=False, use_async_batching=False))
    assert not steps_on_the_host(ContinuousBatchingConfig(use_cuda_graph=True, use_async_batching=True))
    assert not steps_on_the_host(ContinuousBatchingConfig(use_cuda_graph=False, use_async_batching=True))
    path = continuous_engine.paths[0]
    plain = params_for(max_tokens=12)
    constrained = params_for(max_tokens=12, structured_outputs={"regex": PHONE})
    controlled = params_for(max_tokens=12, logit_bias={"11": -100})
    assert all(path.can_serve(params) for params in (plain, constrained, controlled))
    monkeypatch.setattr(path, "masks_rows", False)  # as a manager with CUDA graphs resolves it
    assert path.can_serve(plain) and not path.can_serve(constrained) and not path.can_serve(controlled)
    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    tokens, reason = tokens_of(continuous_engine.start(tokenizer("A phone number:")["input_ids"], constrained))
    assert paths == ["generate"] and reason == "stop"
    assert re.fullmatch(PHONE, tokenizer.decode(tokens, skip_special_tokens=True))
