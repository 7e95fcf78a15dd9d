"""The response models: what each route answers, whole and streamed, and the one error shape.

Every model forbids keys it does not name (except the two that carry an engine's or a tokenizer's own keys):
tests/test_protocol.py validates real answers against them, so a field the handlers start sending must be added
here, or that test fails.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


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
    # vLLM's, with prompt_logprobs: the conversation's tokens as rendered, each as a completion choice carries them
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None


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

