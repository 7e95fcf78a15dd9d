"""The HTTP contract that needs no process: Flask's test client over the app factory with a scripted engine.

Error shapes, SSE frames, API keys and the request guards are decided above the engines (http/), once for both;
here they run in the test's own process in well under a second each. What crosses a process (gunicorn, signals,
real engines, sockets) stays in the server tests (test_server_e2e.py, test_guards.py, test_openai_api.py).
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from gunicorn_llm.engines.base import ChoiceUpdate, EngineBusy, GenerationStream, TokenLogprob
from gunicorn_llm.http.protocol import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest
from gunicorn_llm.http.unhonoured_fields import UNHONOURED
from gunicorn_llm.request_schema import SamplingParams
from scripted_engine import ScriptedEngine, scripted_client, scripted_client_of

pytestmark = pytest.mark.inprocess

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
ANSWER = " one two three"
QUESTION = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="module")
def client(tokenizer):
    return scripted_client(tokenizer, [ANSWER], MAX_INSTANCES=4)


@pytest.fixture(scope="module")
def guarded(tokenizer, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# accepted keys\n{KEY}\n\nanother-key\n")
    return scripted_client(tokenizer, [ANSWER], API_KEY_FILE=str(keys), MAX_BODY_BYTES=4096, MAX_INSTANCES=4)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()["error"]


# -- request validation: a 400 that names the field ---------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"instances": ["hi"], "params": {"temperature": "hot"}}, "params.temperature"),
    ({"instances": ["hi"], "params": {"top_p": 1.5}}, "params.top_p"),
    ({"instances": []}, "instances"),
    ({"params": {}}, "instances"),
])
def test_bad_infer_requests_get_a_400_naming_the_field(client, body, param):
    error = error_of(client.post("/infer", json=body), 400)
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize("route", ["/infer", "/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_a_400_in_the_one_error_shape(client, route):
    error = error_of(client.post(route, data=b'{"instances": [', content_type="application/json"), 400)
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and "malformed JSON" in error["message"]


def test_generate_refuses_a_stream_flag_that_is_not_a_boolean(client):
    assert error_of(client.post("/generate", json={"prompt": "Hi", "stream": "yes"}), 400)["param"] == "stream"


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", {"model": "no-such-model", "prompt": "Hi"}, "model"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**6}, "max_tokens"),
])
def test_openai_routes_refuse_in_openais_error_shape(client, route, body, param):
    response = client.post(route, json=body)
    error = error_of(response, 404 if param == "model" else 400)
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if param == "model" else "invalid_request_error")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 7}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),  # a lone surrogate: JSON carries it, no tokenizer takes it
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/tokenize", {"messages": QUESTION, "continue_final_message": True}, None),  # and the generation prompt
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content"),
    ("/tokenize", ["not", "an", "object"], None),
    ("/detokenize", {"tokens": [1, -1]}, "tokens.1"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
])
def test_tokenizer_routes_refuse_bad_input_naming_the_field(client, path, body, param):
    error = error_of(client.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_too_many_prompts_in_one_request(client):
    error = error_of(client.post("/infer", json={"instances": list("abcde"), "params": {"max_tokens": 1}}), 400)
    assert "at most 4" in error["message"]


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(client):
    error = error_of(client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 2000}), 400)
    assert error["param"] == "max_tokens" and "2000" in error["message"]
    assert str(ScriptedEngine.max_model_len) in error["message"]


def test_deeply_nested_json_is_refused_cleanly(client):
    response = client.post("/infer", data="[" * 2000 + "]" * 2000, content_type="application/json")
    assert error_of(response, 400)["code"] == 400


# -- response shapes ----------------------------------------------------------------------------------------------


def sse_events(response) -> list[bytes]:
    return [line for line in response.get_data().split(b"\n") if line]


def test_a_streamed_completion_is_sse_frames_ending_with_usage_and_done(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = sse_events(response)
    assert all(event.startswith(b"data: ") for event in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(choice["text"] for chunk in chunks for choice in chunk["choices"]) == ANSWER
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_a_streamed_chat_starts_with_the_role_and_ends_with_a_finish_reason(client):
    response = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, "stream": True})
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in sse_events(response)[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_infer_answers_a_bare_list_in_order(client):
    response = client.post("/infer", json={"instances": ["a", "b"], "params": {"max_tokens": 3}})
    assert response.get_json() == [ANSWER, ANSWER]


def test_every_response_names_its_worker_and_request(client):
    response = client.get("/health")
    assert response.headers["X-Worker-Pid"].isdigit() and response.headers["X-Request-Id"]


# -- API keys and the body limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/infer", {"instances": ["Hi"], "params": {"max_tokens": 1}}),
    ("/generate", {"prompt": "Hi", "max_tokens": 1}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1}),
    ("/vllm-url-infer", {"instances": ["Hi"], "params": {"max_tokens": 1}}),
    ("/tokenize", {"prompt": "Hi"}),
    ("/detokenize", {"tokens": [1]}),
])
def test_generation_and_tokenizer_routes_need_a_key(guarded, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = guarded.post(path, json=body, headers=headers)
        assert error_of(response, 401)["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert guarded.post(path, json=body, headers=AUTH).status_code == 200
    assert guarded.post(path, json=body, headers={"Authorization": "Bearer another-key"}).status_code == 200


def test_tokenizer_info_needs_a_key(guarded):
    assert guarded.get("/tokenizer_info").status_code == 401
    assert guarded.get("/tokenizer_info", headers=AUTH).status_code == 200


def test_health_and_readiness_stay_open_by_default(guarded):
    for path in ("/health", "/ready"):
        assert guarded.get(path).status_code == 200


def test_a_body_over_the_limit_is_413(guarded):
    assert error_of(guarded.post("/infer", json={"instances": ["x" * 5000]}, headers=AUTH), 413)["code"] == 413


# -- chat-template controls ---------------------------------------------------------------------------------------

# A template that shows what reached it: the flag a reasoning model's template reads, the documents, the ending.
PROBE_TEMPLATE = (
    "{% if enable_thinking %}<think>{% endif %}{% for document in documents or [] %}[{{ document.text }}]{% endfor %}"
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def probe_client(embedded_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.chat_template = PROBE_TEMPLATE
    return scripted_client(tokenizer, [ANSWER]), tokenizer


@pytest.mark.parametrize(("controls", "rendered"), [
    ({}, "user: Hi\nassistant:"),
    ({"chat_template_kwargs": {"enable_thinking": True}}, "<think>user: Hi\nassistant:"),
    ({"documents": [{"text": "Paris is in France."}]}, "[Paris is in France.]user: Hi\nassistant:"),
    ({"add_generation_prompt": False}, "user: Hi\n"),
])
def test_chat_template_controls_reach_the_template(probe_client, controls, rendered):
    client, tokenizer = probe_client
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert client.post("/tokenize", json={"messages": QUESTION, **controls}).get_json()["tokens"] == expected
    answer = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, **controls})
    assert answer.get_json()["usage"]["prompt_tokens"] == len(expected)


@pytest.fixture(scope="module")
def effort_probe(embedded_model_dir):
    """A client over a template that shows reasoning_effort and enable_thinking; the prompts its engine started."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.chat_template = "{% if reasoning_effort %}({{ reasoning_effort }}){% endif %}" + PROBE_TEMPLATE
    engine = ScriptedEngine(tokenizer, [tokenizer(ANSWER, add_special_tokens=False)["input_ids"]])
    prompts = []
    engine.start = lambda prompt_ids, params: prompts.append(prompt_ids) or ScriptedEngine.start(engine, prompt_ids,
                                                                                               params)
    return scripted_client_of(engine), tokenizer, prompts


@pytest.mark.parametrize(("controls", "rendered"), [
    ({"reasoning_effort": "low"}, "(low)<think>user: Hi\nassistant:"),
    ({"reasoning_effort": "none"}, "(none)user: Hi\nassistant:"),
    # the client's own enable_thinking stands; reasoning_effort stands over the client's own
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, "(high)user: Hi\nassistant:"),
    ({"reasoning_effort": "max", "chat_template_kwargs": {"reasoning_effort": "low"}},
     "(max)<think>user: Hi\nassistant:"),
    ({}, "user: Hi\nassistant:"),
])
def test_reasoning_effort_reaches_the_template_as_vllm_hands_it(effort_probe, controls, rendered):
    client, tokenizer, prompts = effort_probe
    answer = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, **controls})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert prompts[-1] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("controls", "param"), [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"continue_final_message": True}, None),  # with the default add_generation_prompt
    ({"documents": "Paris"}, "documents"),
])
def test_chat_template_controls_that_cannot_apply_are_400s(client, controls, param):
    error = error_of(client.post("/v1/chat/completions", json={"messages": QUESTION, **controls}), 400)
    assert error["param"] == param, error


def test_a_request_id_becomes_the_answers_id(client):
    answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "request_id": "eval-7"})
    assert answer.get_json()["id"] == "cmpl-eval-7"


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/v1/chat/completions", {"messages": QUESTION, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": QUESTION, "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"prompt": "Hi", "use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"messages": QUESTION, "echo": True}, "echo"),
])
def test_a_field_the_server_does_not_honour_is_a_400_naming_it_not_a_silent_200(client, route, body, field):
    error = error_of(client.post(route, json=body), 400)
    assert error["param"] == field and "not honoured" in error["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_field_is_honoured_or_refused_never_both(route):
    # a field a route's model comes to honour must leave the refused list (the real servers walk them all:
    # test_openai_api.py)
    honoured = (CompletionRequest if route == "/v1/completions" else ChatCompletionRequest).model_fields
    assert set(honoured) & set(UNHONOURED[route]) == set()


@pytest.mark.parametrize("route", ["/infer", "/generate"])
def test_a_sampling_param_is_honoured_or_refused_never_both(route):
    assert set(SamplingParams.model_fields) & set(UNHONOURED[route]) == set()


def test_echo_with_max_tokens_0_answers_the_scored_prompt_and_generates_nothing(client, tokenizer):
    prompt_ids = tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    body = {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 0}
    answer = client.post("/v1/completions", json=body).get_json()
    choice = answer["choices"][0]
    assert choice["text"] == "Hello there" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [None] + [ScriptedEngine.SCORED_LOGPROB] * (len(prompt_ids) - 1)
    pieces = [tokenizer.decode([token]) for token in prompt_ids]
    assert choice["logprobs"]["tokens"] == pieces
    assert choice["logprobs"]["text_offset"] == [len("".join(pieces[:i])) for i in range(len(pieces))]
    assert answer["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                               "total_tokens": len(prompt_ids)}
    chunks = [json.loads(event.removeprefix(b"data: "))
              for event in sse_events(client.post("/v1/completions", json={**body, "stream": True}))[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "Hello there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


MULTI_BYTE = "Tokyo 東京タワー, robots 🤖🤖 and 𝔘𝔫𝔦 text"


def _assert_offsets_index_the_text(logprobs: dict, text: str) -> None:
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert "".join(tokens) == text
    assert all(text[offset:offset + len(token)] == token for offset, token in zip(offsets, tokens, strict=True))


def _streamed_completion(client, body: dict) -> dict:
    """A streamed completion's text, and its tokens and offsets, joined from its events."""
    streamed = {"text": "", "tokens": [], "text_offset": []}
    for event in sse_events(client.post("/v1/completions", json=body))[:-1]:
        part = json.loads(event.removeprefix(b"data: "))["choices"][0]
        streamed["text"] += part["text"]
        for key in ("tokens", "text_offset"):
            streamed[key] += (part["logprobs"] or {}).get(key, [])
    return streamed


def test_echoed_tokens_of_multi_byte_characters_read_as_in_the_text_so_offsets_index_it(tokenizer):
    """A token holding part of a character's bytes reads "" until the token that finishes it (vLLM's server names
    them so): alone each would read U+FFFD, the offsets after it would drift, and a client that splits context from
    continuation by text_offset (lm-eval's) would count a token to the wrong side."""
    answer = "🤖 東京"
    client = scripted_client(tokenizer, [answer])
    prompt_ids = tokenizer(MULTI_BYTE)["input_ids"]
    assert any(tokenizer.decode([token]).endswith("\ufffd") for token in prompt_ids)  # characters split in bytes
    body = {"prompt": MULTI_BYTE, "max_tokens": 8, "echo": True, "logprobs": 1, "prompt_logprobs": 0}
    choice = client.post("/v1/completions", json=body).get_json()["choices"][0]
    assert choice["text"] == MULTI_BYTE + answer
    _assert_offsets_index_the_text(choice["logprobs"], MULTI_BYTE + answer)
    assert "" in choice["logprobs"]["tokens"]
    decoded = [next(iter(position.values()))["decoded_token"] for position in choice["prompt_logprobs"][1:]]
    assert decoded == choice["logprobs"]["tokens"][1:len(prompt_ids)]
    # prompt_logprobs cannot stream (vLLM's rule)
    streamed = _streamed_completion(client, {**body, "stream": True, "prompt_logprobs": None})
    assert streamed["text"] == MULTI_BYTE + answer
    _assert_offsets_index_the_text(streamed, MULTI_BYTE + answer)


def test_a_replacement_character_of_the_text_itself_reads_as_one_and_the_offsets_still_index_the_text(tokenizer):
    """Text that already holds U+FFFD (scraped text often does) has a token for it whose bytes are whole: it reads
    "\ufffd", not "" as a character's unfinished bytes do; else every offset after it drifts by one, and lm-eval
    counts a context token to the continuation or a continuation token to the context."""
    prompt = "caf\ufffd au lait, \ufffd\ufffd then 東京 \ufffd"
    answer = "ok \ufffd 🤖"
    assert "\ufffd" in [tokenizer.decode([token]) for token in tokenizer(prompt)["input_ids"]]
    client = scripted_client(tokenizer, [answer, answer])
    body = {"prompt": prompt, "max_tokens": 8, "echo": True, "logprobs": 1}
    choice = client.post("/v1/completions", json=body).get_json()["choices"][0]
    assert choice["text"] == prompt + answer
    _assert_offsets_index_the_text(choice["logprobs"], prompt + answer)
    streamed = _streamed_completion(client, {**body, "stream": True})
    assert streamed["text"] == prompt + answer
    _assert_offsets_index_the_text(streamed, prompt + answer)


def test_chat_logprobs_name_multi_byte_characters_as_they_read_whole_and_streamed(tokenizer):
    answer = "robots 🤖🤖 at 東京タワー"
    client = scripted_client(tokenizer, [answer])
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "logprobs": True, "top_logprobs": 1}
    whole = client.post("/v1/chat/completions", json=body).get_json()["choices"][0]
    tokens = [entry["token"] for entry in whole["logprobs"]["content"]]
    assert "".join(tokens) == whole["message"]["content"] == answer and "" in tokens
    streamed = []
    for event in sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}))[:-1]:
        logprobs = json.loads(event.removeprefix(b"data: "))["choices"][0]["logprobs"]
        streamed += [entry["token"] for entry in (logprobs or {}).get("content", [])]
    assert streamed == tokens


def test_an_engine_without_memory_for_a_prompt_now_answers_503_to_retry(tokenizer):

    class Busy(ScriptedEngine):
        def prompt_logprobs(self, prompts, top=0, deadline=None):
            raise EngineBusy("out of memory scoring 900 tokens of this prompt now; retry later")

    client = scripted_client_of(Busy(tokenizer, [tokenizer(ANSWER, add_special_tokens=False)["input_ids"]]))
    response = client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 0, "echo": True,
                                                    "logprobs": 0})
    error = error_of(response, 503)
    assert error["type"] == "service_unavailable" and "out of memory scoring" in error["message"]
    assert response.headers["Retry-After"] == "1"


def test_a_logprob_of_minus_infinity_is_sent_as_vllms_floor_on_every_route(tokenizer):
    """A token a constraint or control excluded has -inf; JSON has no infinity, and vLLM's server sends -9999.0."""

    class Excluding(ScriptedEngine):
        def start(self, prompt_ids, params):
            stream = GenerationStream(params.n, abort=self._abort)
            token = self.script[0][0]
            entry = TokenLogprob(token, -0.5, ((token, -0.5), (token + 1, float("-inf"))))
            stream.publish(ChoiceUpdate(0, [token], [entry], "length"))
            return stream

        def prompt_logprobs(self, prompts, top=0, deadline=None):
            excluded = float("-inf")
            return [[TokenLogprob(t, excluded, ((t, excluded),), 1) for t in prompt[1:]] for prompt in prompts]

    client = scripted_client_of(Excluding(tokenizer, [tokenizer(ANSWER, add_special_tokens=False)["input_ids"]]))
    completion = client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 1, "echo": True,
                                                      "logprobs": 2, "prompt_logprobs": 1}).get_json()["choices"][0]
    assert completion["logprobs"]["token_logprobs"][1:-1] == [-9999.0] * (len(completion["logprobs"]["tokens"]) - 2)
    assert sorted(completion["logprobs"]["top_logprobs"][-1].values()) == [-9999.0, -0.5]
    assert {entry["logprob"] for position in completion["prompt_logprobs"][1:] for entry in position.values()} == {
        -9999.0}
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                                                     "logprobs": True, "top_logprobs": 2}).get_json()
    alternatives = chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [entry["logprob"] for entry in alternatives] == [-0.5, -9999.0]


def test_max_tokens_0_without_echo_is_a_400(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0})
    assert error_of(response, 400)["param"] == "max_tokens"


# -- token controls and prompt_logprobs: validated before anything runs ------------------------------------------


@pytest.mark.parametrize(("route", "fields", "param", "named"), [
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "'abc'"),
    ("/v1/completions", {"logit_bias": {" 5": 1}}, "logit_bias", "' 5'"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias", "-100 to 100"),
    ("/v1/completions", {"logit_bias": {"5": True}}, "logit_bias.5", "valid number"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias", "99999999"),
    ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias", "99999999"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids", "at least 1"),
    ("/v1/completions", {"allowed_token_ids": [3, 123456789]}, "allowed_token_ids", "123456789"),
    ("/v1/chat/completions", {"allowed_token_ids": [-1]}, "allowed_token_ids.0", "greater than or equal to 0"),
    ("/v1/completions", {"bad_words": [" \n "]}, "bad_words", "tokenizes to no token"),
    ("/v1/completions", {"bad_words": [""]}, "bad_words.0", "at least 1 character"),
    ("/v1/completions", {"bad_words": [f"word{i}" for i in range(100)]}, "bad_words", "at most 128"),
    ("/v1/completions", {"min_tokens": 5, "max_tokens": 2}, "min_tokens", "must not exceed max_tokens (2)"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs", "stream"),
    ("/v1/chat/completions", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs", "stream"),  # as vLLM
])
def test_token_controls_and_prompt_logprobs_that_cannot_apply_are_400s_naming_the_field(client, route, fields, param,
                                                                                       named):
    body = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": QUESTION}
    error = error_of(client.post(route, json={**body, **fields}), 400)
    assert error["param"] == param and named in error["message"], error


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/infer", {"instances": ["Hi"], "params": {"logit_bias": {"99999999": 1}}}, "params.logit_bias"),
    ("/infer", {"instances": ["Hi"], "params": {"bad_words": ["  "]}}, "params.bad_words"),
    ("/infer", {"instances": ["Hi"], "params": {"min_tokens": 17}}, "params.min_tokens"),
    ("/generate", {"prompt": "Hi", "allowed_token_ids": [99999999]}, "allowed_token_ids"),
])
def test_the_native_routes_check_token_controls_too(client, route, body, param):
    assert error_of(client.post(route, json=body), 400)["param"] == param


def test_token_controls_reach_the_engine_as_sampling_params(tokenizer):
    engine = ScriptedEngine(tokenizer, [tokenizer(ANSWER, add_special_tokens=False)["input_ids"]])
    started = []
    engine.start = lambda prompt_ids, params: started.append(params) or ScriptedEngine.start(engine, prompt_ids,
                                                                                           params)
    client = scripted_client_of(engine)
    body = {"logit_bias": {"7": -100, "3": 2.5}, "allowed_token_ids": [3, 7, 9], "bad_words": ["x", "x", "y"],
            "min_tokens": 2}
    assert client.post("/v1/completions", json={"prompt": "Hi", **body}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": QUESTION, **body}).status_code == 200
    assert client.post("/infer", json={"instances": ["Hi"], "params": body}).status_code == 200
    for params in started:
        assert params.logit_bias == ((3, 2.5), (7, -100.0)) and params.allowed_token_ids == (3, 7, 9)
        assert params.bad_words == ("x", "y") and params.min_tokens == 2
    assert len(started) == 3


def test_prompt_logprobs_come_per_choice_in_vllms_shape(client, tokenizer):
    prompt_ids = tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    body = {"prompt": ["Hello there", "Hello there"], "max_tokens": 2, "prompt_logprobs": 0, "n": 2}
    choices = client.post("/v1/completions", json=body).get_json()["choices"]
    assert len(choices) == 4
    expected = [None] + [{str(token): {"logprob": ScriptedEngine.SCORED_LOGPROB, "rank": None,
                                       "decoded_token": tokenizer.decode([token])}} for token in prompt_ids[1:]]
    assert all(choice["prompt_logprobs"] == expected for choice in choices)
    # as vLLM: echo with logprobs reports them as prompt_logprobs too; without either, no such key
    echoed = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 0, "echo": True,
                                                  "logprobs": 0}).get_json()["choices"][0]
    assert echoed["prompt_logprobs"] == expected
    plain = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 2}).get_json()["choices"][0]
    assert "prompt_logprobs" not in plain


def test_prompt_logprobs_on_chat_score_the_rendered_conversation(client):
    # vLLM's: one top-level list for the conversation as the template rendered it, in a completion choice's shape
    rendered = client.post("/tokenize", json={"messages": QUESTION}).get_json()["tokens"]
    scored = client.post("/v1/completions", json={"prompt": rendered, "max_tokens": 1, "prompt_logprobs": 1})
    answer = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, "prompt_logprobs": 1})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    ChatCompletionResponse.model_validate(answer.get_json())
    assert answer.get_json()["prompt_logprobs"] == scored.get_json()["choices"][0]["prompt_logprobs"]
    assert len(answer.get_json()["prompt_logprobs"]) == len(rendered)
    plain = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}).get_json()
    assert "prompt_logprobs" not in plain


def test_a_stop_string_within_the_first_min_tokens_does_not_end_the_answer(client):
    # the scripted answer is " one two three", one token each
    def text(**fields):
        body = {"prompt": "Hi", "max_tokens": 5, **fields}
        return client.post("/v1/completions", json=body).get_json()["choices"][0]["text"]

    assert text(stop=["one"]) == " "
    assert text(stop=["one"], min_tokens=2) == " one two three"
    assert text(stop=["three"], min_tokens=2) == " one two "
    # as vLLM: a stop string counts when it ends past the first min_tokens tokens' text, wherever it starts
    assert text(stop=["o t"], min_tokens=2) == " one tw"
    assert text(stop=["o t"], min_tokens=3) == " one two three"
