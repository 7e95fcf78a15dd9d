"""The wire protocol (gunicorn_llm/http/protocol/) against the app that serves it, in-process.

The route table is the app's: every public route of Flask's url_map is in it and nothing else. The OpenAPI document
generated from it is valid OpenAPI 3.1, its `$ref`s resolve, and it takes the requests the docs show. Real answers
of every route (Flask's test client over the scripted engine, tests/scripted_engine.py) validate strictly against
the route's response models: whole answers, each event or line of a streamed one, and errors. The response models
forbid keys they do not name, so a field the handlers start sending without documenting it fails here.
`/generate`, validated through protocol.GenerateRequest, refuses in the shape every route refuses in.
"""

from __future__ import annotations

import json

import jsonschema_rs  # schemathesis' JSON Schema validator
import pytest
import schemathesis
from pydantic import BaseModel
from transformers import AutoTokenizer

from gunicorn_llm.http.openapi_spec import openapi_document
from gunicorn_llm.http.protocol import EVENT_STREAM, JSON_LINES, ROUTES, ErrorResponse, GenerateRequest, Route
from gunicorn_llm.request_schema import SamplingParams, parse_infer_request
from test_http_inprocess import ANSWER, QUESTION, error_of, scripted_client

pytestmark = pytest.mark.inprocess

ROUTE = {route.key: route for route in ROUTES}


@pytest.fixture(scope="module")
def client(embedded_model_dir, tmp_path_factory):
    # /metrics and /workers read the workers' metric files, a folder gunicorn's master sets up: here an empty one
    # (this process's own values are not in files, so /workers lists no worker: the live fuzz test sees them).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path_factory.mktemp("metrics")))
        yield scripted_client(AutoTokenizer.from_pretrained(embedded_model_dir), [ANSWER], MAX_INSTANCES=4)


# -- the route table is the app's -------------------------------------------------------------------------------


def test_the_app_serves_exactly_the_routes_of_the_table(client):
    served = {(method, rule.rule) for rule in client.application.url_map.iter_rules()
              if not rule.endpoint.endswith("static")  # the monitor page's files: not part of the API
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == set(ROUTE)
    document = openapi_document()
    assert {(method.upper(), path) for path, item in document["paths"].items() for method in item} == served


# -- the document ------------------------------------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_document_is_valid_and_complete():
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 meta-schema
    text = json.dumps(document)
    assert "$defs" not in text and '"definitions"' not in text
    for ref in set(_refs(document)):  # every reference resolves inside the document
        assert ref.startswith("#/components/"), ref
        node = document
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]
    for schema in document["components"]["schemas"].values():
        jsonschema_rs.meta.validate(schema)  # each is a valid JSON Schema (2020-12, OpenAPI 3.1's dialect)
    for route in ROUTES:
        responses = document["paths"][route.path][route.method.lower()]["responses"]
        assert "200" in responses, route.key
        if route.method == "POST":
            assert {"400", "413", "503"} <= set(responses), route.key
    error = document["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    # The models' bounds are kept (the fuzzer explores their edges), also where the OpenAI fields meet them.
    schemas = document["components"]["schemas"]
    temperature = schemas["SamplingParams"]["properties"]["temperature"]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 100)
    assert schemas["SamplingParams"]["properties"]["top_p"]["exclusiveMinimum"] == 0
    chat_n = schemas["ChatCompletionRequest"]["properties"]["n"]["anyOf"][0]
    assert (chat_n["minimum"], chat_n["maximum"]) == (1, 64)
    assert schemas["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]["maximum"] == 20


def test_openapi_document_accepts_the_documented_requests():
    """The request bodies README.md and docs/api.md show are valid against the document; out-of-range ones are not."""
    schemas = openapi_document()["components"]["schemas"]
    registry = {"components": {"schemas": schemas}}

    def valid(name: str, body) -> bool:
        validator = jsonschema_rs.Draft202012Validator({**registry, "$ref": f"#/components/schemas/{name}"})
        return validator.is_valid(body)

    assert valid("InferRequest", {"instances": ["The capital of France is"],
                                  "params": {"temperature": 0, "max_tokens": 16, "sampling_num": 2}})
    assert valid("InferRequest", {"instances": ["a"], "params": {"stop": "\n"}})
    assert not valid("InferRequest", {"instances": ["a"], "params": {"top_p": 1.5}})
    assert not valid("InferRequest", {"instances": []})
    chat = [{"role": "user", "content": "hi"}]
    assert valid("GenerateRequest", {"prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 10})
    assert not valid("GenerateRequest", {"prompt": "x", "n": 2})
    assert not valid("GenerateRequest", {"prompt": "x", "stream": "yes"})  # refused by the handler and the document
    assert valid("CompletionRequest", {"prompt": [[1, 2], [3]], "max_tokens": 5, "stream": True})
    assert not valid("CompletionRequest", {"prompt": "x", "temperature": -1})
    assert valid("CompletionRequest", {"prompt": "x", "echo": True, "max_tokens": 0})  # scores the prompt only
    assert not valid("CompletionRequest", {"prompt": "x", "max_tokens": -1})
    for prompt in ("", [], [""], [-1], [[]]):  # refused by the handler, stated on the model
        assert not valid("CompletionRequest", {"prompt": prompt}), prompt
    assert valid("InferRequest", {"instances": ["a"], "params": None})
    assert valid("ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert not valid("ChatCompletionRequest", {"messages": []})
    assert not valid("ChatCompletionRequest", {"messages": chat, "continue_final_message": True})
    number_part = [{"role": "user", "content": [{"type": "text", "text": 1}]}]
    assert not valid("ChatCompletionRequest", {"messages": number_part})
    assert valid("TokenizeRequest", {"prompt": "hi", "add_special_tokens": False})
    assert valid("TokenizeRequest", {"messages": chat, "add_generation_prompt": False, "continue_final_message": True})
    assert not valid("TokenizeRequest", {"messages": chat, "continue_final_message": True})  # the generation prompt
    assert not valid("TokenizeRequest", {"prompt": "hi", "messages": "hi"})  # with messages it is a conversation
    assert not valid("TokenizeRequest", {})
    assert valid("DetokenizeRequest", {"tokens": [1, 2]}) and not valid("DetokenizeRequest", {"tokens": [-1]})


# -- real answers against the response models --------------------------------------------------------------------

STREAM_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
CHAT = {"messages": QUESTION, "max_tokens": 3}

# (method, path, JSON body or None, the status expected): at least one per route, and a streamed one per streaming
# route (checked below); variants where the answer's shape changes (n, logprobs, echo, prompt scores, errors).
EXCHANGES = [
    ("POST", "/infer", {"instances": ["a", "b"], "params": {"max_tokens": 3}}, 200),
    ("POST", "/infer", {"instances": ["a"], "params": {"max_tokens": 3, "n": 2}}, 200),
    ("POST", "/infer", {"instances": ["Hello there"], "params": {"prompt_logprobs": 0}}, 200),
    ("POST", "/infer", {"instances": ["a", "b"], "params": {"max_tokens": 3, "n": 2}, "stream": True}, 200),
    ("POST", "/infer", {"instances": ["a"], "params": {"top_p": 1.5}}, 400),
    ("POST", "/vllm-url-infer", {"instances": ["a"], "params": {"max_tokens": 3}}, 200),
    ("POST", "/vllm-url-infer", {"instances": ["a"], "params": {"max_tokens": 3}, "stream": True}, 200),
    ("POST", "/generate", {"prompt": "Hi", "max_tokens": 3}, 200),
    ("POST", "/generate", {"prompt": "Hi", "max_tokens": 3, "stream": True}, 200),
    ("POST", "/generate", {"prompt": "Hi", "n": 2}, 400),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, 200),
    ("POST", "/v1/completions", {"prompt": ["Hi", "Yo"], "max_tokens": 3, "n": 2, "echo": True, "logprobs": 2}, 200),
    ("POST", "/v1/completions", {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 0}, 200),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "logprobs": 1, **STREAM_USAGE}, 200),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "echo": True, "stream": True}, 200),
    ("POST", "/v1/completions", {"prompt": "Hi", "model": "no-such-model"}, 404),
    ("POST", "/v1/chat/completions", CHAT, 200),
    ("POST", "/v1/chat/completions", {**CHAT, "n": 2, "logprobs": True, "top_logprobs": 2}, 200),
    ("POST", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1, **STREAM_USAGE}, 200),
    ("POST", "/v1/chat/completions", {**CHAT, "n": 2, "stream": True}, 200),
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/tokenize", {"prompt": "Hi", "return_token_strs": True}, 200),
    ("POST", "/tokenize", {"messages": QUESTION}, 200),
    ("POST", "/detokenize", {"tokens": [1, 2]}, 200),
    ("POST", "/detokenize", {"tokens": [-1]}, 400),
    ("GET", "/tokenizer_info", None, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", "/health", None, 200),
    ("GET", "/ready", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/workers", None, 200),
    ("GET", "/", None, 200),
    ("GET", "/openapi.json", None, 200),
]


def test_the_exchanges_cover_every_route_and_every_stream():
    assert {(method, path) for method, path, _, _ in EXCHANGES} == set(ROUTE)
    streamed = {(method, path) for method, path, body, status in EXCHANGES
                if status == 200 and isinstance(body, dict) and body.get("stream")}
    assert streamed == {route.key for route in ROUTES if route.chunk is not None or route.key == ("POST", "/generate")}


def strictly(model: type[BaseModel], data: bytes | str) -> BaseModel:
    """`data` as `model`: JSON types as they are (no string for a number), no key the model does not name."""
    return model.model_validate_json(data, strict=True)


def conforming(route: Route, response) -> list[BaseModel | str]:
    """The answer, checked against the route's models: what each part of it validated as (text as it is)."""
    data = response.get_data()
    if response.status_code != 200:
        assert response.status_code in route.errors
        return [strictly(ErrorResponse, data)]
    if response.mimetype == "application/json":
        return [strictly(route.response, data)]
    if response.mimetype == route.stream_type == EVENT_STREAM:
        events = data.decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], events[-2:]
        assert all(event.startswith("data: ") for event in events[:-2])
        return [strictly(route.chunk, event.removeprefix("data: ")) for event in events[:-2]]
    if response.mimetype == route.stream_type == JSON_LINES:
        lines = data.decode().split("\n")
        assert lines[-1] == ""
        return [strictly(route.chunk, line) for line in lines[:-1]]
    assert response.mimetype == route.text_type, response.mimetype
    return [data.decode()]


@pytest.mark.parametrize(("method", "path", "body", "status"), EXCHANGES,
                         ids=[f"{method} {path} {number}" for number, (method, path, _, _) in enumerate(EXCHANGES)])
def test_real_answers_validate_against_the_response_models(client, method, path, body, status):
    response = client.open(path, method=method, json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    parts = conforming(ROUTE[(method, path)], response)
    assert parts


# -- /generate validates through its model ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "Hi", "stream": "yes"}, "stream"),
    ({"prompt": "Hi", "stream": None}, "stream"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hi", "n": 2}, "n"),
    ({"prompt": "Hi", "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt": "Hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    (["Hi"], None),
])
def test_generate_refuses_in_the_shape_every_route_refuses_in(client, body, param):
    error = error_of(client.post("/generate", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["message"].startswith(f"{param}: "), error


def test_generate_ignores_keys_it_does_not_know_and_streams_on_the_query(client):
    body = {"prompt": "Hi", "max_tokens": 3, "sampling_num": 2, "best_of": 1}
    whole = client.post("/generate", json=body)
    streamed = client.post("/generate?streaming=TRUE", json=body)
    assert whole.get_data(as_text=True) == streamed.get_data(as_text=True) == ANSWER
    assert whole.status_code == streamed.status_code == 200


def test_generate_and_infer_refuse_the_sampling_params_of_vllms_they_do_not_honour(client):
    refused = client.post("/generate", json={"prompt": "Hi", "best_of": 2})
    assert refused.status_code == 400 and refused.json["error"]["param"] == "best_of"
    refused = client.post("/infer", json={"instances": ["Hi"], "params": {"use_beam_search": True}})
    assert refused.status_code == 400, refused.json
    assert refused.json["error"]["param"] == "params.use_beam_search"
    assert "`params.use_beam_search` is not honoured by this server: beam search" in refused.json["error"]["message"]


def test_generate_params_are_the_same_params_as_infers():
    """So equal requests through either route batch together: equal, hash-equal, the same fields set."""
    fields = {"temperature": 1e-6, "stop": "\n", "stop_token_ids": [2], "max_tokens": 5, "seed": 3,
              "structured_outputs": {"choice": ["yes", "no"]}}
    generated = GenerateRequest.model_validate({"prompt": "Hi", "stream": True, **fields}).sampling_params()
    inferred = parse_infer_request({"instances": ["Hi"], "params": fields})[0].params
    assert type(generated) is SamplingParams
    assert generated == inferred and hash(generated) == hash(inferred)
    assert generated.model_fields_set == inferred.model_fields_set == set(fields)
    assert GenerateRequest.model_validate({"prompt": "Hi"}).sampling_params() == SamplingParams()



# -- the answers' JSON encoding (http/json_encoding.py) ------------------------------------------------------------


def test_answers_are_encoded_by_msgspec_with_json_for_what_it_cannot_encode(client):
    """Answers are compact UTF-8 JSON with their keys in order; a float that is not finite is null (valid JSON, where
    `json` writes -Infinity); what msgspec refuses (a lone surrogate, an integer beyond 64 bits) still encodes."""
    from gunicorn_llm.http.json_encoding import encode_json

    answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "echo": True, "logprobs": 1})
    text = answer.get_data(as_text=True)
    assert answer.status_code == 200 and text.startswith('{"id":') and ": " not in text[:200], text[:200]
    assert encode_json({"b": float("-inf"), "a": "é"}) == '{"b":null,"a":"é"}'
    assert json.loads(encode_json({"a": "\ud800", "b": 2**70})) == {"a": "\ud800", "b": 2**70}
    # a client's lone surrogate: the 400 that names the problem still encodes
    error = error_of(client.post("/v1/completions", data='{"prompt": "\\ud800", "max_tokens": 1}',
                                 content_type="application/json"), 400)
    assert error["message"], error
