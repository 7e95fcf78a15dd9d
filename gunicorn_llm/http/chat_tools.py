"""Function calling and reasoning on `/v1/chat/completions`: the request's `tools` and `tool_choice`, and each answer
read apart into `content`, `reasoning_content` and `tool_calls`, whole or streamed, in vLLM's shapes.

- `tool_choice` `required` or a named function: the answer is constrained, through the server's structured outputs
  (both engines), to the JSON schema vLLM's server builds for it: a list of `{"name", "parameters"}` objects (one at
  most with `parallel_tool_calls: false`), or the named function's arguments. Every answer that ends is then a
  well-formed call, read here without a parser (vLLM's server asks for `--tool-call-parser` even for these).
- `auto` (the default when tools are sent): the model decides, and vLLM's tool-call parser finds its calls
  (`--enable-auto-tool-choice --tool-call-parser NAME`); without them a 400, as in vLLM.
- `none`: the tools are still shown to the template, as vLLM does; the answer is text.
- `--reasoning-parser NAME`: vLLM's reasoning parser moves the model's reasoning out of `content`.
vLLM's parsers are composed and checked at start by engines/output_parsers.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import current_app
from pydantic import ValidationError

from gunicorn_llm.engines.base import Engine
from gunicorn_llm.http.protocol import FunctionDefinition, NamedToolChoice, Tool, ToolFields
from gunicorn_llm.request_schema import RequestError, StructuredOutputs, as_request_error

OUTPUT_PARSER_KEY = "llm_output_parser"  # app.extensions: vLLM's Parser class, or None
AUTO_TOOL_CHOICE_KEY = "ENABLE_AUTO_TOOL_CHOICE"  # app.config: --enable-auto-tool-choice


def template_tools(tools: Sequence[Tool] | None) -> list[dict] | None:
    """Tools as chat templates take them (also /tokenize's)."""
    return [tool.model_dump(exclude_none=True) for tool in tools or ()] or None


def _arguments_schema(function: FunctionDefinition) -> dict[str, Any]:
    # vLLM's: a function without parameters still takes a JSON object
    return function.parameters or {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolUse:
    """One request's tools and resolved tool choice."""

    tools: Sequence[Tool]
    choice: str | NamedToolChoice
    parallel: bool

    @classmethod
    def of(cls, request: ToolFields) -> ToolUse:
        choice = request.tool_choice or ("auto" if request.tools else "none")
        if choice == "auto" and not current_app.config.get(AUTO_TOOL_CHOICE_KEY):
            raise RequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                               'set (or send tool_choice "required", "none" or a named function)', "tool_choice")
        return cls(tuple(request.tools or ()), choice, request.parallel_tool_calls)

    @property
    def named(self) -> str | None:
        return self.choice.function.name if isinstance(self.choice, NamedToolChoice) else None

    @property
    def forced(self) -> bool:
        """Whether the answer must be a call (required, or a named function): constrained to its schema."""
        return self.choice == "required" or self.named is not None

    def template_tools(self) -> list[dict] | None:
        return template_tools(self.tools)

    def _schema(self) -> dict[str, Any]:
        """vLLM's schema for a forced choice (vllm.tool_parsers.utils.get_json_schema_from_tools)."""
        if self.named is not None:
            return _arguments_schema(next(t.function for t in self.tools if t.function.name == self.named))
        definitions: dict[str, Any] = {}
        calls = []
        for index, tool in enumerate(self.tools):
            arguments = dict(_arguments_schema(tool.function))
            # references resolve from the top, as in vLLM, which refuses these as well
            defined = arguments.pop("$defs", {})
            param = f"tools.{index}.function.parameters"
            if not isinstance(defined, dict):
                raise RequestError(f"{param}: `$defs` must be an object", param)
            if any(definitions.get(name, schema) != schema for name, schema in defined.items()):
                raise RequestError(f"{param}: a `$defs` entry another tool defines differently", param)
            definitions.update(defined)
            calls.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                         "parameters": arguments},
                          "required": ["name", "parameters"]})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        if definitions:
            schema["$defs"] = definitions
        return schema

    def checked_constraint(self, engine: Engine) -> StructuredOutputs | None:
        """A forced choice's constraint, compiled by the engine; a schema it cannot compile is a 400 naming the
        tool's parameters."""
        if not self.forced:
            return None
        constraint = StructuredOutputs.model_validate({"json": self._schema()})
        try:
            engine.check_structured_outputs(constraint)
        except ValueError as error:
            for index, tool in enumerate(self.tools):  # which tool's schema it was, for the message
                if self.named in (None, tool.function.name):
                    try:
                        engine.check_structured_outputs(StructuredOutputs.model_validate(
                            {"json": _arguments_schema(tool.function)}))
                    except ValueError as own_error:
                        param = f"tools.{index}.function.parameters"
                        raise RequestError(f"{param}: {own_error}", param) from None
            raise RequestError(f"tools: the tool-call schema {error}", "tools") from None
        return constraint


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:16]}"  # vLLM's form


def _call(name: str, arguments: str, index: int | None = None) -> dict:
    call = {"id": new_tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _vllm_request(tool_use: ToolUse, include_reasoning: bool):
    """vLLM's request model, which its parsers read (tools, tool_choice, include_reasoning)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    try:
        return ChatCompletionRequest.model_validate({
            "messages": [{"role": "user", "content": ""}], "include_reasoning": include_reasoning,
            "tools": [tool.model_dump(exclude_none=True) for tool in tool_use.tools] or None,
            "tool_choice": tool_use.choice.model_dump() if tool_use.named else tool_use.choice,
        })
    except ValidationError as error:  # tools ours accept and vLLM's do not
        raise RequestError(f"tools: {as_request_error(error).message}", "tools") from None


def _message_fields(delta) -> dict:
    """A vLLM DeltaMessage's fields in our answer: reasoning under both of its names (vLLM's `reasoning`, and
    `reasoning_content`, which most clients read)."""
    fields: dict[str, Any] = {}
    if delta.reasoning is not None:
        fields["reasoning_content"] = fields["reasoning"] = delta.reasoning
    if delta.content is not None:
        fields["content"] = delta.content
    if delta.tool_calls:
        fields["tool_calls"] = [call.model_dump(exclude_none=True) for call in delta.tool_calls]
    return fields


class ChatOutput:
    """How one request's answers become messages. `message()` reads a whole answer; `stream()` gives a choice's
    reader of streamed deltas."""

    def __init__(self, tool_use: ToolUse, prompt_ids: list[int], tokenizer, include_reasoning: bool,
                 chat_template_kwargs: dict[str, Any] | None):
        self.tool_use = tool_use
        self.prompt_ids = prompt_ids
        self.tokenizer = tokenizer
        self.include_reasoning = include_reasoning
        # as vLLM's server does: a parser may follow the template's switches (enable_thinking false: no reasoning)
        self.chat_template_kwargs = chat_template_kwargs or {}
        parser_cls = current_app.extensions.get(OUTPUT_PARSER_KEY)
        # a forced call is JSON from its first token: no reasoning, nothing for a parser to find
        self.parser_cls = None if tool_use.forced else parser_cls
        self.vllm_request = _vllm_request(tool_use, include_reasoning) if self.parser_cls is not None else None

    def _parser(self):
        # stateful: one per choice, as in vLLM
        return self.parser_cls(self.tokenizer, self.vllm_request.tools, chat_template_kwargs=self.chat_template_kwargs)

    def message(self, text: str, token_ids: list[int], finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a whole answer, and its finish reason."""
        if self.tool_use.forced:
            calls = self._forced_calls(text)
            # OpenAI's and vLLM's: tool_calls for required; a named function's call ends with stop
            finish = "tool_calls" if self.tool_use.choice == "required" and finish_reason == "stop" else finish_reason
            return {"role": "assistant", "content": "", "tool_calls": calls}, finish
        if self.parser_cls is None:
            return {"role": "assistant", "content": text}, finish_reason
        parser = self._parser()
        parser.set_prompt_token_ids(self.prompt_ids)
        reasoning, content, calls = parser.parse(text, self.vllm_request, enable_auto_tools=True,
                                                 model_output_token_ids=token_ids)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None and self.include_reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls:
            calls = calls if self.tool_use.parallel else calls[:1]
            message["tool_calls"] = [{"id": call.id or new_tool_call_id(), "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in calls]
            finish_reason = "tool_calls"
        return message, finish_reason

    def _forced_calls(self, text: str) -> list[dict]:
        """A forced answer's calls, as vLLM's server reads them. Cut short by max_tokens (finish_reason "length"): a
        named function's call carries the arguments as far as they came, as streamed (OpenAI's way too); a required
        list that did not close gives no call, never the half list as text."""
        if self.tool_use.named is not None:  # the arguments themselves, as generated
            return [_call(self.tool_use.named, text)] if text.strip() else []
        try:
            return [_call(call["name"], json.dumps(call["parameters"], ensure_ascii=False))
                    for call in json.loads(text)]
        except (json.JSONDecodeError, TypeError, KeyError):  # not the schema's whole shape: cut short
            return []

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One choice's streamed deltas read apart: `delta()` turns new text into the fields of a chunk's delta (None:
    nothing to send yet), `finish_reason()` the engine's reason into the answer's."""

    def __init__(self, output: ChatOutput):
        self.output = output
        self.tool_use = output.tool_use
        self.parser = output._parser() if output.parser_cls is not None else None
        self.text = ""  # the answer so far (forced calls)
        self.calls_sent = 0  # forced: calls whose delta went out
        self.read_to = 0  # required: where the next call of the list starts
        self.called = False

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict | None:
        if self.tool_use.named is not None:
            return self._named_delta(text)
        if self.tool_use.forced:
            return self._required_delta(text)
        if self.parser is None:
            return {"content": text} if text else None
        message = self.parser.parse_delta(text, token_ids, self.output.vllm_request, self.output.prompt_ids,
                                          finished=finished)
        if message is None:
            return None
        fields = _message_fields(message)
        if "tool_calls" in fields:
            if not self.tool_use.parallel:  # vLLM's: the first call only
                fields["tool_calls"] = [call for call in fields["tool_calls"] if call["index"] == 0] or None
                if not fields["tool_calls"]:
                    del fields["tool_calls"]
            self.called = self.called or "tool_calls" in fields
        return fields or None

    def _named_delta(self, text: str) -> dict | None:
        """vLLM's shape: the first delta opens the call (id, name) with the first text of the arguments, the others
        carry the arguments' text as it comes."""
        if not text:
            return None
        self.called = True
        if self.calls_sent:
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        self.calls_sent = 1
        return {"tool_calls": [_call(self.tool_use.named, text, index=0)]}

    def _required_delta(self, text: str) -> dict | None:
        """Each call of the generated list as soon as its object is complete, whole (name and arguments)."""
        self.text += text
        decoder = json.JSONDecoder()
        calls = []
        while True:
            start = self.text.find("{", self.read_to)
            if start < 0:
                break
            try:
                value, end = decoder.raw_decode(self.text, start)
                calls.append(_call(value["name"], json.dumps(value["parameters"], ensure_ascii=False),
                                   index=self.calls_sent + len(calls)))
            except json.JSONDecodeError:
                break  # the object is not complete yet
            except (TypeError, KeyError):  # not the schema's shape (the grammar rules it out): no call
                break
            self.read_to = end
        if not calls:
            return None
        self.calls_sent += len(calls)
        self.called = True
        return {"tool_calls": calls}

    def finish_reason(self, reason: str | None) -> str | None:
        if reason is None or self.tool_use.named is not None:
            return reason
        if self.tool_use.forced:
            return "tool_calls" if reason == "stop" and self.called else reason
        return "tool_calls" if self.called else reason
