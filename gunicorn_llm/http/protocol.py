"""The wire protocol in one place: the route table, the models of what each route takes and answers.

`ROUTES` lists every route the app serves: its method and path, the pydantic model its body is validated through,
the models of its answer (whole, and one line or event of a streamed one) and the errors it may answer. The OpenAPI
document (openapi_spec.py, `GET /openapi.json`) is generated from this table and these models, the fuzz test
(tests/test_fuzz.py) walks the same table, and tests/test_protocol.py checks that the app serves exactly these routes
and that real answers validate against the response models. The response models forbid keys they do not name: a
field the handlers start sending must be added here, or that test fails.

Most request models still live beside their handlers (request_schema.py, openai_api.py, tokenizer_api.py) and are
imported from there; `GenerateRequest`, which `/generate` validates through, lives here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationInfo, field_validator

from gunicorn_llm.http.openai_api import ChatCompletionRequest, CompletionRequest
from gunicorn_llm.http.tokenizer_api import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from gunicorn_llm.request_schema import InferRequest, SamplingParams

# -- request bodies ----------------------------------------------------------------------------------------------

# `/generate?streaming=VALUE` streams for these values (any case).
STREAMING_QUERY_VALUES = ("1", "true", "yes")


class GenerateRequest(SamplingParams):
    """`POST /generate`: a prompt and SamplingParams' fields at the top level (one text: `n` is 1, no prompt scores).
    Keys the server does not know are ignored (with a warning)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, description="the text to continue")
    stream: bool = Field(False, description="stream the text as chunked HTTP (as does `?streaming=true`)")
    n: int = Field(1, ge=1, le=1, description="/generate answers one text; use /infer or /v1/completions for more")
    prompt_logprobs: None = Field(None, description="not on /generate; use /infer")

    @field_validator("n", "prompt_logprobs", mode="before")
    @classmethod
    def _one_text(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "prompt_logprobs":
            asks_more = value is not None
        else:  # other types than an integer get the field's own type error
            asks_more = type(value) is int and value != 1
        if asks_more:
            raise ValueError("/generate answers one text: use /infer or /v1/completions for n or prompt_logprobs")
        return value

    def sampling_params(self) -> SamplingParams:
        """The request's sampling params, equal (and hash-equal) to /infer's for the same fields, so they batch
        together. Built from this model's fields, validated and converted already: validating them again would run
        the conversions on their results."""
        names = self.model_fields_set & SamplingParams.model_fields.keys()
        return SamplingParams.model_construct(_fields_set=names, **{name: getattr(self, name) for name in names})


class TokenizeRequest(RootModel[TokenizeCompletionRequest | TokenizeChatRequest]):
    """`POST /tokenize`: a text (`prompt`) or a conversation (`messages`; a body with `messages` is one)."""


# -- response bodies ---------------------------------------------------------------------------------------------


class _Answer(BaseModel):
    """A response body: every key the server sends is named (a new one must be added here; tests/test_protocol.py)."""

    model_config = ConfigDict(extra="forbid")


class _OpenAnswer(BaseModel):
    """A response body that carries keys beyond those named (an engine's or a tokenizer's own)."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Answer):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, service_unavailable, ...")
    param: str | None = Field(description="the offending field (dotted path), when there is one")
    code: int = Field(description="the HTTP status")


class ErrorResponse(_Answer):
    """Every error this server sends, in OpenAI's shape."""

    error: ErrorDetail


class InferResponse(RootModel[list[str | list[str] | list[float]]]):
    """One entry per instance: the text; with `n` > 1 a list of texts; with `prompt_logprobs` the prompt's scores."""


class InferStreamLine(_Answer):
    """One line of a streamed `/infer` answer (`application/x-ndjson`); an error ends the stream as an ErrorResponse."""

    instance: int
    choice: int
    text: str
    finish_reason: str | None


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokenLogprob(_Answer):
    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(_Answer):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    # vLLM's, in whole answers with prompt_logprobs (or echo with logprobs): null, then per prompt token its entry and
    # the likeliest alternatives', by token id
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None


class CompletionResponse(_Answer):
    """`/v1/completions`, whole."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class CompletionChunk(CompletionResponse):
    """One server-sent event's data of a streamed `/v1/completions` answer: the text since the last one; the last
    chunk (with `stream_options.include_usage`) has no choices and the usage."""


class ChatTopLogprob(_Answer):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Answer):
    content: list[ChatTokenLogprob]


class CalledFunction(_Answer):
    name: str
    arguments: str = Field(description="the arguments, a JSON object as text")


class ToolCall(_Answer):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(_Answer):
    role: Literal["assistant"]
    content: str | None = Field(description="null where a parser read the whole answer as tool calls (as vLLM)")
    # with --reasoning-parser: the thinking read out of the answer, under vLLM's old and new names
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Answer):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Answer):
    """`/v1/chat/completions`, whole."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None


class CalledFunctionDelta(_Answer):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Answer):
    """A streamed piece of a tool call: the first names it (id, type, function name), the rest add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: CalledFunctionDelta


class ChatDelta(_Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Answer):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Answer):
    """One server-sent event's data of a streamed `/v1/chat/completions` answer."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None


class TokenizeResponse(_Answer):
    count: int = Field(description="how many tokens")
    max_model_len: int = Field(description="the model's context, in tokens")
    tokens: list[int]
    token_strs: list[str] | None = Field(description="the tokens as strings, with `return_token_strs`")


class DetokenizeResponse(_Answer):
    prompt: str = Field(description="the tokens' text, special tokens included")


class TokenizerInfo(_OpenAnswer):
    """The tokenizer's configuration as in its tokenizer_config.json (special tokens as text), as vLLM answers it."""

    tokenizer_class: str
    chat_template: str | None = Field(None, description="the model's chat template (Jinja), when it has one")


class ModelCard(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Answer):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Answer):
    status: Literal["ok"]


class Ready(_OpenAnswer):
    """The answering worker: its pid and slice, and what its engine reports (model, dtype, `running`, ...)."""

    status: Literal["ready"]
    pid: int
    slice: str
    model: str


class WorkerState(_Answer):
    pid: int
    slice: str
    ready: bool
    generation_requests: int = Field(description="generation requests the worker has answered")
    engine_core: int | None = Field(None, description="a front end's shared vLLM engine core (its pid)")


class EngineCoreState(_Answer):
    """A slice's shared vLLM engine core (`--workers-per-gpu` K > 1) and the supervisor that launched it."""

    slice: int
    supervisor_pid: int
    engine_core_pids: list[int]
    generation: int = Field(description="engine cores launched for this slice before this one")
    ready: bool
    client_count: int = Field(description="client indices: attachments the core takes before it is relaunched")
    failure: str | None = Field(description="why the supervisor stopped or gave up")


class Workers(_Answer):
    workers: int = Field(description="workers the server runs")
    loaded: int = Field(description="workers whose model is loaded")
    ready: list[WorkerState]
    engine_cores: list[EngineCoreState] | None = Field(None, description="the slices' shared vLLM engine cores")


class OpenAPIDocument(RootModel[dict[str, Any]]):
    """The OpenAPI 3.1 description of these routes."""


# -- routes ------------------------------------------------------------------------------------------------------

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
