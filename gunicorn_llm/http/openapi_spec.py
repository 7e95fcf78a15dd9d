"""The OpenAPI 3.1 description of every route, generated from the pydantic models that validate the requests.

`GET /openapi.json` (app.py) answers `openapi_json()`: built once per process from `model_json_schema`-style
output of the request models (request_schema.InferRequest and SamplingParams; openai_api.CompletionRequest and
ChatCompletionRequest; tokenizer_api's requests; `GenerateRequest` below for `/generate`, whose handler reads its body
by hand) and of small response models below. Every `$ref` points into `components/schemas`; numeric bounds
(ge/le/gt/lt) stay in the document, so a fuzzer (tests/test_fuzz.py runs schemathesis against it) explores the edges.

A few adjustments say what the handlers do around the models, so the document describes the server a client sees:

- Keys a route does not know are ignored (with a warning in the log), never refused: request objects allow
  additional properties, although SamplingParams itself forbids them (the routes drop unknown keys before it).
- The OpenAI requests' sampling fields are validated again as SamplingParams (openai_api._sampling_params):
  they carry SamplingParams' bounds here.
- `stop` takes one string or a list; stop strings and prompts must not be empty.
- A chat message's text part (`{"type": "text"}`) must hold its `text` as a string.
- `/tokenize` takes a body with `messages` as a conversation, any other as a text; a conversation may not ask for
  both `continue_final_message` and `add_generation_prompt` (true by default).
- `/infer` takes `"params": null` as the defaults; `/generate` streams for `"stream": true` and answers whole for any
  other value.
- Streams: `/v1` server-sent events are described one event at a time (OpenAPI 3.1's reading of a text/event-stream
  `schema`), their data as JSON chunks; `/infer`'s NDJSON lines and `/generate`'s text as strings.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema

from gunicorn_llm.http.openai_api import ChatCompletionRequest, CompletionRequest
from gunicorn_llm.http.tokenizer_api import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from gunicorn_llm.request_schema import InferRequest, SamplingParams

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"


# -- request bodies the handlers read without a model ------------------------------------------------------------


class GenerateRequest(SamplingParams):
    """`POST /generate`: a prompt and SamplingParams' fields at the top level (one text: `n` is 1, no prompt scores)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow", allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="the text to continue")
    # native_api.generate streams for `true` only and answers whole for any other value (it does not refuse one).
    stream: Any = Field(False, description="`true`: stream the text as chunked HTTP (as does `?streaming=true`); "
                                           "any other value answers whole")
    n: int = Field(1, ge=1, le=1, description="/generate answers one text; use /infer or /v1/completions for more")
    prompt_logprobs: None = Field(None, description="not on /generate; use /infer")


class TokenizeRequest(RootModel[TokenizeCompletionRequest | TokenizeChatRequest]):
    """`POST /tokenize`: a text (`prompt`) or a conversation (`messages`; a body with `messages` is one)."""


# -- response bodies ---------------------------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, service_unavailable, ...")
    param: str | None = Field(description="the offending field (dotted path), when there is one")
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """Every error this server sends, in OpenAI's shape."""

    error: ErrorDetail


class InferResponse(RootModel[list[str | list[str] | list[float]]]):
    """One entry per instance: the text; with `n` > 1 a list of texts; with `prompt_logprobs` the prompt's scores."""


class InferStreamLine(BaseModel):
    """One line of a streamed `/infer` answer (`application/x-ndjson`); an error ends the stream as an ErrorResponse."""

    instance: int
    choice: int
    text: str
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokenLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    # vLLM's, in whole answers with prompt_logprobs (or echo with logprobs): null, then per prompt token its entry and
    # the likeliest alternatives', by token id
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None


class CompletionResponse(_Open):
    """`/v1/completions`; streamed, each server-sent event is this object with `object` `text_completion` too."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Open):
    """`/v1/chat/completions`; streamed, server-sent events of `chat.completion.chunk` objects with `delta`s."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None


class ChatDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Open):
    """One server-sent event's data of a streamed `/v1/chat/completions` answer."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None


class TokenizeResponse(BaseModel):
    count: int = Field(description="how many tokens")
    max_model_len: int = Field(description="the model's context, in tokens")
    tokens: list[int]
    token_strs: list[str] | None = Field(description="the tokens as strings, with `return_token_strs`")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the tokens' text, special tokens included")


class TokenizerInfo(_Open):
    """The tokenizer's configuration as in its tokenizer_config.json (special tokens as text), as vLLM answers it."""

    tokenizer_class: str
    chat_template: str | None = Field(None, description="the model's chat template (Jinja), when it has one")


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(_Open):
    """The answering worker: its pid and slice, and what its engine reports (model, dtype, `running`, ...)."""

    status: Literal["ready"]
    pid: int
    slice: str
    model: str


class WorkerState(BaseModel):
    pid: int
    slice: str
    ready: bool


class Workers(BaseModel):
    workers: int = Field(description="workers the server runs")
    loaded: int = Field(description="workers whose model is loaded")
    ready: list[WorkerState]


_MODELS: list[type[BaseModel]] = [
    InferRequest, SamplingParams, GenerateRequest, CompletionRequest, ChatCompletionRequest, TokenizeRequest,
    DetokenizeRequest, ErrorResponse, InferResponse, InferStreamLine, CompletionResponse, ChatCompletionResponse,
    ChatCompletionChunk, TokenizeResponse, DetokenizeResponse, TokenizerInfo, ModelList, Health, Ready, Workers,
]

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
    _, top = models_json_schema([(model, "validation") for model in _MODELS], ref_template=_REF)
    schemas = copy.deepcopy(top["$defs"])
    _adjust(schemas)
    return schemas


# -- operations --------------------------------------------------------------------------------------------------


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


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
    "400": ("BadRequest", ("the request cannot be served as sent: malformed JSON, a missing or wrong field, a value "
                           "out of range, a prompt plus max_tokens over the model's context, too many prompts")),
    "401": ("Unauthorized", "no valid API key (only when the server was started with --api-key or --api-key-file)"),
    "404": ("NotFound", "the requested model is not the one this server serves"),
    "413": ("PayloadTooLarge", "the body is larger than --max-body-bytes"),
    "500": ("EngineFailure", "the engine failed on this request; the worker keeps serving"),
    "503": ("Unavailable", ("the worker's model is still loading, or the worker already holds --max-waiting "
                            "requests waiting for their first token (both with Retry-After)")),
    "504": ("Timeout", "the request took longer than --request-timeout"),
}


def _error_responses() -> dict[str, dict]:
    responses = {}
    for status, (name, description) in _ERRORS.items():
        headers = dict(_COMMON_HEADERS)
        if status == "503":
            headers["Retry-After"] = {"description": "seconds to wait before retrying", "required": False,
                                      "schema": {"type": "integer"}}
        if status == "401":
            headers["WWW-Authenticate"] = {"required": False, "schema": {"type": "string"}}
        responses[name] = {"description": description, "headers": headers,
                           "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    return responses


def _errors(*statuses: str) -> dict[str, dict]:
    return {status: {"$ref": f"#/components/responses/{_ERRORS[status][0]}"} for status in statuses}


def _ok(description: str, content: dict[str, dict]) -> dict:
    return {"200": {"description": description, "headers": _COMMON_HEADERS, "content": content}}


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


_TEXT = {"schema": {"type": "string"}}


def _events(chunk: str) -> dict:
    """Server-sent events: each one's data is a `chunk` as JSON (an ErrorResponse if the stream failed), the last
    one's `[DONE]`. (OpenAPI 3.1 has a text/event-stream `schema` describe one event.)"""
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]},
    }}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


_GENERATION_ERRORS = ("400", "401", "413", "500", "503", "504")
_REQUEST_ID = {"$ref": "#/components/parameters/RequestId"}


def _post(summary: str, description: str, body: str, ok: dict, errors: tuple[str, ...], operation_id: str,
          tag: str, parameters: list | None = None) -> dict:
    return {"post": {
        "operationId": operation_id, "tags": [tag], "summary": summary, "description": description,
        "parameters": [_REQUEST_ID, *(parameters or [])],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {**ok, **_errors(*errors)},
    }}


def _get(summary: str, ok: dict, errors: tuple[str, ...], operation_id: str, tag: str,
         description: str | None = None) -> dict:
    operation = {"operationId": operation_id, "tags": [tag], "summary": summary, "parameters": [_REQUEST_ID],
                 "responses": {**ok, **_errors(*errors)}}
    if description:
        operation["description"] = description
    return {"get": operation}


def _infer(summary: str, operation_id: str) -> dict:
    """`/infer`'s operation: also served as `/vllm-url-infer`, the same handler."""
    return _post(
        summary,
        "The answer is a JSON list, one entry per instance. With `\"stream\": true`, one JSON object per line "
        "as text is produced (InferStreamLine). With `params.prompt_logprobs` set, each entry is the prompt's "
        "per-token log-probabilities instead.",
        "InferRequest",
        _ok("the texts, or the prompts' log-probabilities", {
            **_json("InferResponse"),
            "application/x-ndjson": {"schema": {"type": "string",
                                                "description": "InferStreamLine objects, one per line"}},
        }),
        _GENERATION_ERRORS, operation_id, "native",
    )


_TOKENIZER_ERRORS = ("400", "401", "404", "413", "503")


def _paths() -> dict[str, dict]:
    return {
        "/infer": _infer("Generate for a batch of prompts (the evaluation toolkit's contract)", "infer"),
        "/vllm-url-infer": _infer("`/infer` under the evaluation toolkit's URL for a vLLM server (the same contract "
                                  "on both engines)", "vllm_url_infer"),
        "/generate": _post(
            "Generate one text for one prompt (grps-vllm compatible)",
            "The body is `prompt`, the sampling params at the top level, and `stream`. The answer is the generated "
            "text as text/plain, streamed as chunked HTTP with `?streaming=true` or `\"stream\": true`.",
            "GenerateRequest",
            _ok("the generated text", {"text/plain": _TEXT}),
            _GENERATION_ERRORS, "generate", "native",
            parameters=[{"name": "streaming", "in": "query", "required": False,
                         "description": "`true`, `1` or `yes` (any case): stream the text",
                         "schema": {"type": "string"}}],
        ),
        "/v1/completions": _post(
            "OpenAI completions",
            "With `stream: true`, server-sent events of CompletionResponse-shaped chunks ending with `data: [DONE]`.",
            "CompletionRequest",
            _ok("the completions", {**_json("CompletionResponse"), "text/event-stream": _events("CompletionResponse")}),
            (*_GENERATION_ERRORS, "404"), "completions", "openai",
        ),
        "/v1/chat/completions": _post(
            "OpenAI chat completions",
            "The messages go through the model's chat template. With `stream: true`, server-sent events of "
            "`chat.completion.chunk` objects ending with `data: [DONE]`. Without max_tokens or "
            "max_completion_tokens the answer may fill the context.",
            "ChatCompletionRequest",
            _ok("the chat completion", {**_json("ChatCompletionResponse"),
                                         "text/event-stream": _events("ChatCompletionChunk")}),
            (*_GENERATION_ERRORS, "404"), "chat_completions", "openai",
        ),
        "/tokenize": _post(
            "Tokenize a text or a conversation with the model's tokenizer (vLLM's /tokenize)",
            "A `prompt` is tokenized as it is (with `add_special_tokens`, by default true); `messages` go through the "
            "chat template as on /v1/chat/completions. Nothing is generated.",
            "TokenizeRequest", _ok("the token ids", _json("TokenizeResponse")), _TOKENIZER_ERRORS, "tokenize",
            "tokenizer",
        ),
        "/detokenize": _post(
            "Token ids to text with the model's tokenizer (vLLM's /detokenize)",
            "Ids outside the vocabulary are a 400.",
            "DetokenizeRequest", _ok("the text", _json("DetokenizeResponse")), _TOKENIZER_ERRORS, "detokenize",
            "tokenizer",
        ),
        "/tokenizer_info": _get("The tokenizer's configuration and chat template (vLLM's /tokenizer_info)",
                                _ok("tokenizer_config.json's keys, special tokens as text", _json("TokenizerInfo")),
                                ("401", "503"), "tokenizer_info", "tokenizer"),
        "/v1/models": _get("The served model", _ok("the one model this server serves", _json("ModelList")),
                           ("401", "503"), "models", "openai"),
        "/health": _get("Liveness: 200 while the worker process lives, also while its model loads",
                        _ok("alive", _json("Health")), ("401",), "health", "monitoring"),
        "/ready": _get("Readiness of the answering worker",
                       _ok("the answering worker's model is loaded", _json("Ready")), ("401", "503"), "ready",
                       "monitoring"),
        "/metrics": _get("Prometheus metrics of all workers",
                         _ok("the Prometheus text exposition format", {"text/plain": _TEXT}), ("401",), "metrics",
                         "monitoring"),
        "/workers": _get("Every worker's pid, slice and readiness",
                         _ok("the server-wide view", _json("Workers")), ("401",), "workers", "monitoring"),
        "/": _get("The live monitor page", _ok("an HTML page that polls /metrics", {"text/html": _TEXT}),
                  ("401",), "monitor_page", "monitoring"),
        "/openapi.json": _get("This document", _ok("the OpenAPI description", {"application/json": {
            "schema": {"type": "object"}}}), ("401",), "openapi", "monitoring"),
    }


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
        "tags": [{"name": "native"}, {"name": "openai"}, {"name": "tokenizer"}, {"name": "monitoring"}],
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
