"""The route table: every route the app serves, with the models it takes and answers.

Each `Route` names its method and path, the request model its body is validated through, the models of its answer
(whole, and one line or event of a streamed one), its errors, and the words of its OpenAPI operation. The OpenAPI
document (http/openapi_spec.py) is generated from this table, the fuzz test (tests/test_fuzz.py) walks it, and
tests/test_protocol.py checks that the app serves exactly these routes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from gunicorn_llm.http.protocol.requests import (
    STREAMING_QUERY_VALUES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from gunicorn_llm.http.protocol.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    DetokenizeResponse,
    Health,
    InferResponse,
    InferStreamLine,
    ModelList,
    OpenAPIDocument,
    Ready,
    TokenizeResponse,
    TokenizerInfo,
    Workers,
)
from gunicorn_llm.request_schema import InferRequest

EVENT_STREAM = "text/event-stream"  # server-sent events: one chunk per event, `data: [DONE]` last
JSON_LINES = "application/x-ndjson"  # one JSON object per line

GENERATION_ERRORS = (400, 401, 413, 500, 503, 504)
TOKENIZER_ERRORS = (400, 401, 404, 413, 503)


@dataclass(frozen=True)
class Route:
    """One route: what it takes and what it answers with 200 (a JSON body, a stream, a text), and its errors."""

    method: Literal["GET", "POST"]
    path: str
    operation_id: str
    tag: str
    summary: str
    answer: str  # what the 200 answer is
    request: type[BaseModel] | None = None  # the JSON body's model (POST routes)
    response: type[BaseModel] | None = None  # the whole JSON answer's model
    chunk: type[BaseModel] | None = None  # a streamed answer's model of one event or line
    stream_type: str | None = None  # the streamed answer's media type
    text_type: str | None = None  # the media type of an answer that is text, not JSON
    errors: tuple[int, ...] = (401,)
    description: str | None = None
    query: Mapping[str, str] = field(default_factory=dict)  # query parameters: name -> meaning

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.path


def _infer_route(path: str, operation_id: str, summary: str) -> Route:
    """`/infer`'s contract: also served as `/vllm-url-infer`, the same handler."""
    return Route(
        "POST", path, operation_id, "native", summary, "the texts, or the prompts' log-probabilities",
        request=InferRequest, response=InferResponse, chunk=InferStreamLine, stream_type=JSON_LINES,
        errors=GENERATION_ERRORS,
        description="The answer is a JSON list, one entry per instance. With `\"stream\": true`, one JSON object per "
                    "line as text is produced (InferStreamLine). With `params.prompt_logprobs` set, each entry is the "
                    "prompt's per-token log-probabilities instead.",
    )


ROUTES: tuple[Route, ...] = (
    _infer_route("/infer", "infer", "Generate for a batch of prompts (the evaluation toolkit's contract)"),
    _infer_route("/vllm-url-infer", "vllm_url_infer",
                 "`/infer` under the evaluation toolkit's URL for a vLLM server (the same contract on both engines)"),
    Route("POST", "/generate", "generate", "native", "Generate one text for one prompt (grps-vllm compatible)",
          "the generated text", request=GenerateRequest, text_type="text/plain", errors=GENERATION_ERRORS,
          description="The body is `prompt`, the sampling params at the top level, and `stream`. The answer is the "
                      "generated text as text/plain, streamed as chunked HTTP with `?streaming=true` or "
                      "`\"stream\": true`.",
          query={"streaming": " or ".join(f"`{value}`" for value in STREAMING_QUERY_VALUES)
                 + " (any case): stream the text"}),
    Route("POST", "/v1/completions", "completions", "openai", "OpenAI completions", "the completions",
          request=CompletionRequest, response=CompletionResponse, chunk=CompletionChunk, stream_type=EVENT_STREAM,
          errors=(*GENERATION_ERRORS, 404),
          description="With `stream: true`, server-sent events of CompletionChunk objects ending with `data: [DONE]`."),
    Route("POST", "/v1/chat/completions", "chat_completions", "openai", "OpenAI chat completions",
          "the chat completion", request=ChatCompletionRequest, response=ChatCompletionResponse,
          chunk=ChatCompletionChunk, stream_type=EVENT_STREAM, errors=(*GENERATION_ERRORS, 404),
          description="The messages go through the model's chat template. With `stream: true`, server-sent events of "
                      "`chat.completion.chunk` objects ending with `data: [DONE]`. Without max_tokens or "
                      "max_completion_tokens the answer may fill the context."),
    Route("POST", "/tokenize", "tokenize", "tokenizer",
          "Tokenize a text or a conversation with the model's tokenizer (vLLM's /tokenize)", "the token ids",
          request=TokenizeRequest, response=TokenizeResponse, errors=TOKENIZER_ERRORS,
          description="A `prompt` is tokenized as it is (with `add_special_tokens`, by default true); `messages` go "
                      "through the chat template as on /v1/chat/completions. Nothing is generated."),
    Route("POST", "/detokenize", "detokenize", "tokenizer",
          "Token ids to text with the model's tokenizer (vLLM's /detokenize)", "the text",
          request=DetokenizeRequest, response=DetokenizeResponse, errors=TOKENIZER_ERRORS,
          description="Ids outside the vocabulary are a 400."),
    Route("GET", "/tokenizer_info", "tokenizer_info", "tokenizer",
          "The tokenizer's configuration and chat template (vLLM's /tokenizer_info)",
          "tokenizer_config.json's keys, special tokens as text", response=TokenizerInfo, errors=(401, 503)),
    Route("GET", "/v1/models", "models", "openai", "The served model", "the one model this server serves",
          response=ModelList, errors=(401, 503)),
    Route("GET", "/health", "health", "monitoring",
          "Liveness: 200 while the worker process lives, also while its model loads", "alive", response=Health),
    Route("GET", "/ready", "ready", "monitoring", "Readiness of the answering worker",
          "the answering worker's model is loaded", response=Ready, errors=(401, 503)),
    Route("GET", "/metrics", "metrics", "monitoring", "Prometheus metrics of all workers",
          "the Prometheus text exposition format", text_type="text/plain"),
    Route("GET", "/workers", "workers", "monitoring", "Every worker's pid, slice and readiness",
          "the server-wide view", response=Workers),
    Route("GET", "/", "monitor_page", "monitoring", "The live monitor page", "an HTML page that polls /metrics",
          text_type="text/html"),
    Route("GET", "/openapi.json", "openapi", "monitoring", "This document", "the OpenAPI description",
          response=OpenAPIDocument),
)
