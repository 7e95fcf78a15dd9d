"""The request models: what the routes' JSON bodies are validated through (pydantic), with their checks.

- `/generate`: `GenerateRequest` (a prompt and SamplingParams' fields at the top level).
- `/v1/completions` and `/v1/chat/completions`: OpenAI's requests with vLLM's extensions (structured outputs, token
  controls, chat-template controls, function calling). Their sampling fields are validated again as SamplingParams
  (http/openai_api.py), whose bounds they share.
- `/tokenize` and `/detokenize`: vLLM's tokenizer requests.

`/infer`'s `InferRequest`, and `SamplingParams` and `StructuredOutputs`, which every route validates into, stay in
gunicorn_llm/request_schema.py: the engines take them, and the engines may not import the HTTP layer. What the
handlers do with a request (rendering a conversation through the template, reading tool calls out of an answer) stays
in the handlers' modules.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gunicorn_llm.request_schema import (
    LOGIT_BIAS_JSON,
    STOP_DESCRIPTION,
    STOP_JSON,
    ChoiceCount,
    MaxTokens,
    MinP,
    MinTokens,
    Penalty,
    RepetitionPenalty,
    RequestError,
    SamplingParams,
    Seed,
    StructuredOutputs,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
)

# -- /generate -----------------------------------------------------------------------------------------------------


# `/generate?streaming=VALUE` streams for these values (any case).
STREAMING_QUERY_VALUES = ("1", "true", "yes")


class GenerateRequest(SamplingParams):
    """`POST /generate`: a prompt and SamplingParams' fields at the top level (one text: `n` is 1, no prompt scores).
    Keys the server does not know are ignored (with a warning)."""

    # its keys are ignored with a warning, as SamplingParams' are on /infer: the document says so in the docstring
    model_config = ConfigDict(extra="allow", json_schema_extra=None)

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


# -- /v1/completions and /v1/chat/completions ----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema. `strict` is accepted either way: the answer is always
    constrained to the schema (as by vLLM)."""

    model_config = ConfigDict(strict=True, validate_by_alias=True, validate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` would shadow BaseModel.schema: the field takes its wire name as its alias
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text (no constraint), any JSON object, or JSON following a schema."""

    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs `json_schema` (with `name` and `schema`)")
        return self

    def constraint(self) -> StructuredOutputs | None:
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.type == "json_schema":
            return StructuredOutputs.model_validate({"json": self.json_schema.json_schema})
        return None


class SamplingFields(BaseModel):
    """Fields both OpenAI requests share; unset ones take SamplingParams' defaults."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # the sampling fields take SamplingParams' bounds (they are validated into it, openai_api._sampling_params)
    n: ChoiceCount | None = None
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_JSON)] = Field(None, description=STOP_DESCRIPTION)
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # vLLM's extras
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    user: str | None = None  # accepted, unused
    request_id: str | None = Field(None, min_length=1, description="the answer's id (after its prefix)")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: json, json_object, regex, "
                                                                           "choice or grammar")
    # token controls, checked as SamplingParams' fields
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema({"anyOf": [LOGIT_BIAS_JSON, {"type": "null"}]})] \
        = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    min_tokens: MinTokens | None = None
    prompt_logprobs: TopLogprobs | None = Field(None, description="vLLM's: the prompt tokens' log-probabilities with "
                                                "this many likeliest alternatives (`prompt_logprobs` of each choice "
                                                "on completions, of the answer on chat); whole answers only")

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_in_whole_answers(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("stream"):  # as vLLM
            raise ValueError("not available with stream: true (whole answers only)")
        return value

    def constraint(self) -> tuple[StructuredOutputs | None, str | None]:
        """The answer's constraint, and for response_format the field that set it (for errors)."""
        from_format = self.response_format.constraint() if self.response_format else None
        if self.structured_outputs is not None and from_format is not None:
            raise RequestError("response_format and structured_outputs cannot both constrain the answer",
                               "response_format")
        if self.structured_outputs is not None:
            return self.structured_outputs, None  # errors name its own field
        return from_format, "response_format"


# A prompt's parts as the document states them: none empty, token ids not negative. encode_prompt and
# check_token_ids (http/common.py) check them, with messages that say the vocabulary's size; the model does not.
_PromptText = Annotated[str, Field(json_schema_extra={"minLength": 1})]
_TokenIds = Annotated[list[Annotated[int, Field(json_schema_extra={"minimum": 0})]],
                      Field(json_schema_extra={"minItems": 1})]


class CompletionRequest(SamplingFields):
    prompt: _PromptText | Annotated[list[_PromptText], Field(json_schema_extra={"minItems": 1})] | _TokenIds \
        | Annotated[list[_TokenIds], Field(json_schema_extra={"minItems": 1})]
    add_special_tokens: bool = True  # when a text prompt is tokenized
    # 0 (with echo) scores the prompt without generating
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    logprobs: TopLogprobs | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("at least one prompt is required")
        return value

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class FunctionCallMessage(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, as the answer gave it")


class ToolCallMessage(BaseModel):
    """A call an assistant message made (OpenAI's shape, as answers carry them)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallMessage


_TEXT_PART_HOLDS_TEXT = {"if": {"required": ["type"], "properties": {"type": {"const": "text"}}},
                         "then": {"properties": {"text": {"type": "string"}}}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    # content parts: the document says what _text_parts_hold_text checks
    content: str | list[Annotated[dict[str, Any], Field(json_schema_extra=_TEXT_PART_HOLDS_TEXT)]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = Field(None, description="an assistant message's calls")
    tool_call_id: str | None = Field(None, description="a tool message's answer to this call")

    @field_validator("content")
    @classmethod
    def _text_parts_hold_text(cls, value):
        if isinstance(value, list) and any(part.get("type") == "text" and not isinstance(part.get("text", ""), str)
                                           for part in value):
            raise ValueError("a text part's `text` must be a string")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts carry meaning for a text model
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: tool-call arguments as objects, not JSON text (what transformers'
        templates expect, and what vLLM's server hands them)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [{**call.model_dump(exclude_none=True),
                                      "function": {"name": call.function.name,
                                                   "arguments": _json_or_text(call.function.arguments)}}
                                     for call in self.tool_calls]
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # arguments a model cut short: the template gets the text as it was
        return text


# What the chat template may not be handed through `chat_template_kwargs`: the arguments the server sets itself.
_RESERVED_TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt",
                                          "continue_final_message", "documents", "tools", "chat_template",
                                          "return_dict", "return_tensors"})


class ChatTemplateControls(BaseModel):
    """How a conversation goes through the model's chat template (vLLM's fields, on /v1/chat/completions and
    /tokenize alike)."""

    # the document says what _one_ending checks: continue_final_message true needs add_generation_prompt false
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["continue_final_message"], "properties": {"continue_final_message": {"const": True}}},
        "then": {"required": ["add_generation_prompt"], "properties": {"add_generation_prompt": {"const": False}}},
    })

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="end with the template's opening of an assistant turn")
    continue_final_message: bool = Field(False, description="leave the last message open, to be continued; not "
                                                            "with add_generation_prompt")
    add_special_tokens: bool = Field(False, description="add special tokens on top of those the template writes")
    documents: list[dict[str, Any]] | None = Field(None, description="documents for templates that render them "
                                                                     "(retrieval-augmented generation)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="further variables for the template, "
                                                                          "e.g. enable_thinking")

    @model_validator(mode="after")
    def _one_ending(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_arguments(cls, value):
        reserved = sorted(set(value or ()) & _RESERVED_TEMPLATE_ARGUMENTS)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set through chat_template_kwargs")
        return value

    def template_kwargs(self) -> dict[str, Any]:
        """The template's variables beyond the conversation and the switches above (also the reasoning parser's)."""
        return dict(self.chat_template_kwargs or {})


# -- function calling (chat completions) ---------------------------------------------------------------------------


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments' JSON schema")
    strict: bool | None = Field(None, description="accepted either way: forced calls always follow the schema")


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"] = "function"
    function: FunctionName


class ToolFields(BaseModel):
    """The function-calling fields of a chat request (vLLM's names, checks and messages)."""

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = Field(True, description="false: one tool call at most")

    @field_validator("tools")
    @classmethod
    def _no_empty_tools(cls, value):
        if value == []:
            raise ValueError("`tools` must not be an empty array; send at least one tool or leave the field out")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _a_known_choice(cls, value):
        # one message for a bad choice, rather than one per branch of the union
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError(f"invalid value `{value}`: only named tools, none, auto or required are supported")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_the_tools(cls, value, info: ValidationInfo):
        tools = info.data.get("tools")
        if value not in (None, "none") and not tools:
            raise ValueError("when using `tool_choice`, `tools` must be set")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool `{value.function.name}` has not been passed in `tools`")
        return value


class ChatCompletionRequest(ChatTemplateControls, ToolFields, SamplingFields):
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    include_reasoning: bool = Field(True, description="false: leave out what --reasoning-parser splits off")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="handed to the chat template as vLLM hands it: as `reasoning_effort`, and as "
                          "`enable_thinking` (false for none) unless chat_template_kwargs sets that")

    def template_kwargs(self) -> dict[str, Any]:
        """vLLM's: chat_template_kwargs, with reasoning_effort over them and enable_thinking beside them."""
        kwargs = super().template_kwargs()
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs


# -- /tokenize and /detokenize -------------------------------------------------------------------------------------


class _TokenizerRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None


def _messages_make_a_chat(schema: dict[str, Any]) -> None:
    schema["properties"]["messages"] = False  # tokenizer_api.tokenize reads a body with `messages` as a conversation


class TokenizeCompletionRequest(_TokenizerRequest):
    """`POST /tokenize` of a text."""

    model_config = ConfigDict(json_schema_extra=_messages_make_a_chat)

    prompt: str
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (a BOS, for some models)")
    return_token_strs: bool | None = Field(False, description="also answer the tokens as strings (`token_strs`)")


class TokenizeChatRequest(ChatTemplateControls, _TokenizerRequest):
    """`POST /tokenize` of a conversation, through the model's chat template as `/v1/chat/completions` renders it."""

    tools: list[Tool] | None = Field(None, description="tools for the template to render, as on /v1/chat/completions")

    return_token_strs: bool | None = Field(False, description="also answer the tokens as strings (`token_strs`)")


class DetokenizeRequest(_TokenizerRequest):
    tokens: list[Annotated[int, Field(ge=0)]]


class TokenizeRequest(RootModel[TokenizeCompletionRequest | TokenizeChatRequest]):
    """`POST /tokenize`: a text (`prompt`) or a conversation (`messages`; a body with `messages` is one)."""
