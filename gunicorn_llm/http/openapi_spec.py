"""The OpenAPI 3.1 document of the wire protocol, generated from its route table and models (http/protocol/).

`GET /openapi.json` (app.py) answers `openapi_json()`: built once per process. Each route of `protocol.ROUTES` becomes
an operation (its request body, its answers and errors); the schemas are pydantic's `models_json_schema` of the
routes' models, all in one `components/schemas` that every `$ref` points into. Numeric bounds (ge/le/gt/lt) stay in
the document, so a fuzzer (tests/test_fuzz.py runs schemathesis against it) explores the edges.

What the handlers check around the models (the sampling bounds the OpenAI requests share with SamplingParams, `stop`
as one string or a list, the prompts' parts, a chat message's text parts, `/tokenize`'s two shapes, `"params": null`,
keys a route ignores with a warning) is stated on the models themselves (http/protocol/, request_schema.py), so the
document is generated from them alone. Streams: `/v1` server-sent events are described one event at a time (OpenAPI
3.1's reading of a text/event-stream `schema`), their data as JSON chunks; `/infer`'s NDJSON lines and `/generate`'s
text as strings.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gunicorn_llm.http.protocol import EVENT_STREAM, ROUTES, ErrorResponse, Route

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"


def _component_schemas() -> dict[str, dict]:
    models = {ErrorResponse} | {model for route in ROUTES for model in (route.request, route.response, route.chunk)
                                if model is not None}
    ordered = sorted(models, key=lambda model: model.__name__)  # the same document in every process
    _, top = models_json_schema([(model, "validation") for model in ordered], ref_template=_REF)
    return top["$defs"]


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
