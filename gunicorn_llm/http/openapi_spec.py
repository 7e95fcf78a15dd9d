"""The OpenAPI 3.1 document of the wire protocol, generated from its route table and models (protocol.py).

`GET /openapi.json` (app.py) answers `openapi_json()`: built once per process. Each route of `protocol.ROUTES` becomes
an operation (its request body, its answers and errors); the schemas are pydantic's `models_json_schema` of the
routes' models, all in one `components/schemas` that every `$ref` points into. Numeric bounds (ge/le/gt/lt) stay in
the document, so a fuzzer (tests/test_fuzz.py runs schemathesis against it) explores the edges.

A few adjustments say what the handlers do around the request models, so the document describes the server a client
sees:

- Keys a route does not know are ignored (with a warning in the log), never refused: request objects allow
  additional properties, although SamplingParams itself forbids them (the routes drop unknown keys before it).
- The OpenAI requests' sampling fields are validated again as SamplingParams (openai_api._sampling_params):
  they carry SamplingParams' bounds here.
- `stop` takes one string or a list; stop strings and prompts must not be empty.
- A chat message's text part (`{"type": "text"}`) must hold its `text` as a string.
- `/tokenize` takes a body with `messages` as a conversation, any other as a text; a conversation may not ask for
  both `continue_final_message` and `add_generation_prompt` (true by default).
- `/infer` takes `"params": null` as the defaults.
- Streams: `/v1` server-sent events are described one event at a time (OpenAPI 3.1's reading of a text/event-stream
  `schema`), their data as JSON chunks; `/infer`'s NDJSON lines and `/generate`'s text as strings.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gunicorn_llm.http.protocol import EVENT_STREAM, ROUTES, ErrorResponse, Route

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"


# openai_api._sampling_params: the OpenAI request fields validated again as these SamplingParams fields.
_OPENAI_AS_SAMPLING = {
    name: name for name in ("n", "stop", "seed", "temperature", "top_p", "presence_penalty", "frequency_penalty",
                            "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids",
                            "skip_special_tokens", "max_tokens", "min_tokens")
} | {"max_completion_tokens": "max_tokens"}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _branches(prop: dict) -> list[dict]:
    """The alternatives of a property schema (its anyOf branches, or itself)."""
    return prop.get("anyOf", [prop])


def _copy_bounds(target: dict, source: dict) -> None:
    """SamplingParams' numeric bounds onto the matching-typed branches of an OpenAI request property."""
    for src in _branches(source):
        bounds = {key: src[key] for key in _BOUNDS if key in src}
        for branch in _branches(target):
            if bounds and branch.get("type") == src.get("type"):
                branch.update(bounds)


def _stop_schema(description: str | None) -> dict:
    text = {"type": "string", "minLength": 1}
    schema = {"anyOf": [text, {"type": "array", "items": text}, {"type": "null"}], "default": None}
    if description:
        schema["description"] = description + " (one string or a list; an empty string is refused)"
    return schema


def _adjust(schemas: dict[str, dict]) -> None:
    sampling = schemas["SamplingParams"]
    for name in ("SamplingParams", "GenerateRequest"):
        schemas[name].pop("additionalProperties", None)  # unknown keys are ignored with a warning, not refused
        stop = schemas[name]["properties"]["stop"]
        schemas[name]["properties"]["stop"] = _stop_schema(stop.get("description"))
    schemas["SamplingParams"]["description"] += " Keys the server does not know are ignored (with a warning)."
    # request_schema.parse_infer_request: `"params": null` is the defaults (some clients send it).
    params = schemas["InferRequest"]["properties"]["params"]
    schemas["InferRequest"]["properties"]["params"] = {
        "anyOf": [{"$ref": params.pop("$ref")}, {"type": "null"}], **params,
        "description": "the sampling parameters; absent or null: the defaults",
    }
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schemas[name]["properties"]
        for field, sampling_field in _OPENAI_AS_SAMPLING.items():
            if field in properties:
                _copy_bounds(properties[field], sampling["properties"][sampling_field])
        properties["stop"] = _stop_schema("strings that end generation; not part of the answer") | {
            "title": "Stop"}
    _adjust_tokenize(schemas)
    # openai_api.ChatMessage: a text part's `text` is a string.
    for branch in _branches(schemas["ChatMessage"]["properties"]["content"]):
        if branch.get("type") == "array":
            branch["items"] |= {"if": {"required": ["type"], "properties": {"type": {"const": "text"}}},
                                "then": {"properties": {"text": {"type": "string"}}}}
    # Prompts: a string, a list of strings, token ids, or lists of token ids; none of them empty.
    for branch in _branches(schemas["CompletionRequest"]["properties"]["prompt"]):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch["minItems"] = 1
            items = branch["items"]
            if items.get("type") == "string":
                items["minLength"] = 1
            elif items.get("type") == "integer":
                items["minimum"] = 0
            elif items.get("type") == "array":
                items["minItems"] = 1
                items["items"]["minimum"] = 0


def _adjust_tokenize(schemas: dict[str, dict]) -> None:
    """tokenizer_api.tokenize's choice between its two shapes, and the chat shape's one refused combination."""
    schemas["TokenizeCompletionRequest"]["properties"]["messages"] = False  # a body with messages is a chat
    schemas["TokenizeChatRequest"] |= {
        "if": {"required": ["continue_final_message"], "properties": {"continue_final_message": {"const": True}}},
        "then": {"required": ["add_generation_prompt"], "properties": {"add_generation_prompt": {"const": False}}},
    }


def _component_schemas() -> dict[str, dict]:
    models = {ErrorResponse} | {model for route in ROUTES for model in (route.request, route.response, route.chunk)
                                if model is not None}
    ordered = sorted(models, key=lambda model: model.__name__)  # the same document in every process
    _, top = models_json_schema([(model, "validation") for model in ordered], ref_template=_REF)
    schemas = copy.deepcopy(top["$defs"])
    _adjust(schemas)
    return schemas


# -- operations --------------------------------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": _REF.format(model=model.__name__)}


_HEADERS = {
    "X-Worker-Pid": {"description": "the worker process that answered", "required": True,
                     "schema": {"type": "integer"}},
    "X-GPU-Slice": {"description": "the GPU slice of that worker (`cpu` without GPUs)", "required": True,
                    "schema": {"type": "string"}},
    "X-Request-Id": {"description": "the client's X-Request-Id when it is a sane token, else a new one",
                     "required": True, "schema": {"type": "string"}},
}
_COMMON_HEADERS = {name: {"$ref": f"#/components/headers/{name}"} for name in _HEADERS}

_ERRORS = {
    400: ("BadRequest", ("the request cannot be served as sent: malformed JSON, a missing or wrong field, a value "
                         "out of range, a prompt plus max_tokens over the model's context, too many prompts")),
    401: ("Unauthorized", "no valid API key (only when the server was started with --api-key or --api-key-file)"),
    404: ("NotFound", "the requested model is not the one this server serves"),
    413: ("PayloadTooLarge", "the body is larger than --max-body-bytes"),
    500: ("EngineFailure", "the engine failed on this request; the worker keeps serving"),
    503: ("Unavailable", ("the worker's model is still loading, or the worker already holds --max-waiting "
                          "requests waiting for their first token (both with Retry-After)")),
    504: ("Timeout", "the request took longer than --request-timeout"),
}


def _error_responses() -> dict[str, dict]:
    responses = {}
    for status, (name, description) in _ERRORS.items():
        headers = dict(_COMMON_HEADERS)
        if status == 503:
            headers["Retry-After"] = {"description": "seconds to wait before retrying", "required": False,
                                      "schema": {"type": "integer"}}
        if status == 401:
            headers["WWW-Authenticate"] = {"required": False, "schema": {"type": "string"}}
        responses[name] = {"description": description, "headers": headers,
                           "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return responses


def _events(chunk: type[BaseModel]) -> dict:
    """Server-sent events: each one's data is a `chunk` as JSON (an ErrorResponse if the stream failed), the last
    one's `[DONE]`. (OpenAPI 3.1 has a text/event-stream `schema` describe one event.)"""
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
    }}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _content(route: Route) -> dict[str, dict]:
    """The media types of a route's 200 answer."""
    content = {}
    if route.response is not None:
        content["application/json"] = {"schema": _ref(route.response)}
    if route.chunk is not None:
        if route.stream_type == EVENT_STREAM:
            content[route.stream_type] = _events(route.chunk)
        else:  # lines of JSON: the body is text; its lines are described
            content[route.stream_type] = {"schema": {
                "type": "string", "description": f"{route.chunk.__name__} objects, one per line"}}
    if route.text_type is not None:
        content[route.text_type] = {"schema": {"type": "string"}}
    return content


def _operation(route: Route) -> dict:
    query = [{"name": name, "in": "query", "required": False, "description": meaning, "schema": {"type": "string"}}
             for name, meaning in route.query.items()]
    operation = {"operationId": route.operation_id, "tags": [route.tag], "summary": route.summary}
    if route.description:
        operation["description"] = route.description
    operation["parameters"] = [{"$ref": "#/components/parameters/RequestId"}, *query]
    if route.request is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(route.request)}}}
    operation["responses"] = {
        "200": {"description": route.answer, "headers": _COMMON_HEADERS, "content": _content(route)},
        **{str(status): {"$ref": f"#/components/responses/{_ERRORS[status][0]}"} for status in route.errors},
    }
    return operation


def _paths() -> dict[str, dict]:
    paths: dict[str, dict] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return paths


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once per process; callers must not modify it)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "gunicorn-llm",
            "version": "1",
            "description": "A Gunicorn pre-fork LLM server: the evaluation toolkit's /infer, grps-vllm's /generate, "
                           "an OpenAI-compatible API and vLLM's tokenizer routes. Errors are "
                           "`{\"error\": {message, type, param, code}}`. With --api-key the generation and "
                           "tokenizer routes (and with --protect-monitoring all routes) need "
                           "`Authorization: Bearer <key>`.",
        },
        "tags": [{"name": tag} for tag in dict.fromkeys(route.tag for route in ROUTES)],
        "paths": _paths(),
        "components": {
            "schemas": _component_schemas(),
            "responses": _error_responses(),
            "headers": _HEADERS,
            "parameters": {"RequestId": {
                "name": "X-Request-Id", "in": "header", "required": False,
                "description": "names the request in the access log; echoed in the response (a new id when "
                               "absent, longer than 128 characters, or not one printable token)",
                "schema": {"type": "string"},
            }},
        },
    }


@functools.cache
def openapi_json() -> bytes:
    """The document as the JSON bytes `GET /openapi.json` answers (serialized once per process)."""
    return json.dumps(openapi_document(), separators=(",", ":")).encode()
