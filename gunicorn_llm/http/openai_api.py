"""OpenAI-compatible routes: `/v1/models`, `/v1/completions` and `/v1/chat/completions`, streaming or whole.

Requests are validated with pydantic into the same `SamplingParams` every route uses, and generated through the
same `TextGeneration` (engines/generation.py), so answers, stop strings and cancellation behave as on `/infer`. With
`stream: true` the answer is server-sent events in OpenAI's chunk format ending with `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk. A client that disconnects mid-stream cancels its generation.
Structured outputs (`response_format`, vLLM's `structured_outputs`) become the params' one constraint, which the
engine compiles before the request is admitted: one it cannot compile is a 400 naming the field. Function calling
(`tools`, `tool_choice`) and reasoning (`--reasoning-parser`) on chat completions: chat_tools.py.
Fields of OpenAI's and vLLM's requests that the server does not honour are refused with a 400 naming them
(unhonoured_fields.py); other keys the server does not know are ignored with a warning, as vLLM's server does.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterator, Sequence

from flask import Blueprint, Response, jsonify, stream_with_context
from pydantic import ValidationError

from gunicorn_llm.engines.base import UTF8_MAX_BYTES, ClientGone, Engine, TokenLogprob
from gunicorn_llm.engines.generation import ChoiceResult, TextDelta, TextGeneration
from gunicorn_llm.http.chat_tools import ChatOutput, ToolUse
from gunicorn_llm.http.common import (
    check_model_name,
    check_prompt_count,
    check_structured_outputs,
    check_token_controls,
    current_engine,
    deadline,
    encode_prompt,
    encode_text,
    error_body,
    parse_body,
    read_json_body,
    start_generation,
)
from gunicorn_llm.http.guards import admit
from gunicorn_llm.http.json_encoding import encode_json
from gunicorn_llm.http.protocol import (
    ChatCompletionRequest,
    ChatTemplateControls,
    CompletionRequest,
    SamplingFields,
)
from gunicorn_llm.request_schema import (
    RequestError,
    SamplingParams,
    StructuredOutputs,
    as_request_error,
)

log = logging.getLogger("gunicorn.error")

openai_api = Blueprint("openai", __name__, url_prefix="/v1")


def _sampling_params(engine: Engine, request: SamplingFields, max_tokens: int, logprobs: int | None,
                     tool_constraint: StructuredOutputs | None = None) -> SamplingParams:
    """The request's params, its structured-output constraint checked by the engine (a forced tool call's is
    checked already)."""
    constraint, constraint_field = request.constraint()
    if tool_constraint is not None:
        if constraint is not None:
            raise RequestError("tool_choice required or a named function constrains the answer to the call: leave "
                               "response_format and structured_outputs out", "tool_choice")
        constraint = tool_constraint
    fields = {
        key: getattr(request, key)
        for key in ("n", "stop", "seed", "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                    "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                    "logit_bias", "allowed_token_ids", "bad_words", "min_tokens")
        if getattr(request, key) is not None
    }
    try:
        params = SamplingParams.model_validate({**fields, "max_tokens": max_tokens, "logprobs": logprobs})
    except ValidationError as error:
        raise as_request_error(error) from None
    params = params.model_copy(update={"structured_outputs": constraint})  # validated already, in the request
    if tool_constraint is None:
        check_structured_outputs(engine, params, constraint_field)
    check_token_controls(engine, params)
    return params


@openai_api.get("/models")
def models():
    engine = current_engine()
    return jsonify({"object": "list", "data": [
        {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "gunicorn-llm",
         "max_model_len": engine.max_model_len}
    ]})


# -- /v1/completions ---------------------------------------------------------------------------------------------


@openai_api.post("/completions")
def completions():
    request = parse_body(CompletionRequest, read_json_body(), "/v1/completions")
    engine = current_engine()
    check_model_name(engine, request.model)
    # vLLM's way to score a prompt without generating: echo it (with its logprobs) and ask for no tokens.
    prompt_only = request.max_tokens == 0
    if prompt_only and not request.echo:
        raise RequestError("max_tokens 0 generates nothing: it is for scoring a prompt, with echo (and logprobs)",
                           "max_tokens")
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    params = _sampling_params(engine, request, 1 if prompt_only else max_tokens, request.logprobs)
    check_prompt_count(len(request.prompts()))
    prompts = [encode_prompt(engine, prompt, params, request.add_special_tokens) for prompt in request.prompts()]
    admit()
    # vLLM's: echoed log-probabilities are prompt log-probabilities too, and reported as such in whole answers
    prompt_top = request.prompt_logprobs if request.prompt_logprobs is not None else (
        params.logprobs if request.echo else None)
    scored = engine.prompt_logprobs(prompts, top=prompt_top, deadline=deadline()) if prompt_top is not None else None
    echoed = [_echo(engine, ids, params, scored[index] if scored else None) for index, ids in enumerate(prompts)
              ] if request.echo else None
    if prompt_only:
        generations = [_NothingGenerated(params.n) for _ in prompts]
    else:
        generations = [start_generation(engine, ids, params) for ids in prompts]
    answer = _Answer("cmpl", "text_completion", engine, params, request.request_id)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = _completion_events(answer, prompts, generations, echoed, include_usage)
        return _event_stream(events, generations)
    choices = []
    for prompt_index, generation in enumerate(generations):
        for choice, result in enumerate(generation.collect()):
            text, logprobs = result.text, None
            if params.logprobs is not None:
                logprobs = _completion_logprobs(engine, result.logprobs or [], 0, before=prompts[prompt_index])
            if echoed:
                prompt_text, prompt_logprobs = echoed[prompt_index]
                text = prompt_text + text
                if logprobs is not None:
                    logprobs = _join_logprobs(
                        prompt_logprobs, _completion_logprobs(engine, result.logprobs or [], len(prompt_text),
                                                              before=prompts[prompt_index])
                    )
            choices.append({"index": prompt_index * params.n + choice, "text": text, "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
            if scored is not None:
                choices[-1]["prompt_logprobs"] = _prompt_logprobs(engine, prompts[prompt_index], scored[prompt_index],
                                                                  prompt_top)
            answer.completion_tokens += len(result.token_ids)
    answer.prompt_tokens = sum(len(ids) for ids in prompts)
    return jsonify({**answer.head(), "choices": choices, "usage": answer.usage()})


class _NothingGenerated:
    """The generation of a prompt-only request (max_tokens 0): every choice ends at once, with no token."""

    def __init__(self, choices: int):
        self.choices = choices

    def __iter__(self) -> Iterator[TextDelta]:
        return iter([TextDelta(choice, "", [], None, "length") for choice in range(self.choices)])

    def collect(self) -> list[ChoiceResult]:
        return [ChoiceResult(finish_reason="length") for _ in range(self.choices)]

    def cancel(self) -> None:
        pass


# A log-probability of -inf (a token a constraint or control excluded) is sent as this, as vLLM's server sends it:
# JSON has no infinity.
LOGPROB_FLOOR = -9999.0


def _echo(engine: Engine, prompt_ids: list[int], params: SamplingParams, scored: list[TokenLogprob] | None
          ) -> tuple[str, dict | None]:
    """The prompt's text, and with logprobs its tokens' log-probabilities from `scored` (the first token has none)."""
    text = engine.tokenizer.decode(prompt_ids, skip_special_tokens=params.skip_special_tokens)
    if params.logprobs is None:
        return text, None
    first = engine.token_texts[prompt_ids[0]]
    # the prompt may have been scored with more alternatives, for prompt_logprobs
    logprobs = _completion_logprobs(engine, scored, 0, first_token=first, before=prompt_ids[:1], top=params.logprobs)
    return text, logprobs


def _prompt_logprobs(engine: Engine, prompt_ids: list[int], scored: list[TokenLogprob], top: int
                     ) -> list[dict | None]:
    """vLLM's `prompt_logprobs` of a completion choice (or of a chat answer): null for the first prompt token, then
    for each one {token id: {logprob, rank, decoded_token}} of the prompt token and the `top` likeliest (ranked 1 to
    top, the prompt token by how many are as likely or more), each token read after the prompt tokens before it; a
    log-probability of -inf is LOGPROB_FLOOR."""
    # Written out as loops, not nested comprehensions: an evaluation's scoring answers build hundreds of these per
    # request under the worker's interpreter lock.
    texts, floor = engine.token_texts, LOGPROB_FLOOR
    pieces = texts.in_sequence(prompt_ids)  # each prompt token as it reads where it stands
    positions: list[dict | None] = [None]
    for position, entry in enumerate(scored, start=1):
        chosen, logprob = entry.token_id, entry.logprob
        ranked = {str(chosen): {"logprob": floor if floor > logprob else logprob, "rank": entry.rank,
                                "decoded_token": pieces[position]}}
        for rank, (token, logprob) in enumerate(entry.top[:top], start=1):
            ranked[str(token)] = {"logprob": floor if floor > logprob else logprob, "rank": rank,
                                  "decoded_token": pieces[position] if token == chosen
                                  else texts.at(token, prompt_ids, position)}
        positions.append(ranked)
    return positions


def _completion_logprobs(engine: Engine, tokens: list[TokenLogprob], offset: int, first_token: str | None = None,
                         before: Sequence[int] = (), top: int | None = None):
    """OpenAI's completions `logprobs` object; `offset`: where in the choice's text the first token starts, `before`:
    the token ids before the first (each token is named as it reads in the sequence: TokenTexts.in_sequence), `top`:
    alternatives per token at most (None: all the tokens have)."""
    texts, floor = engine.token_texts, LOGPROB_FLOOR
    ids = [token.token_id for token in tokens]
    pieces = texts.in_sequence(ids, before)
    sequence = [*before[-UTF8_MAX_BYTES:], *ids]
    shift = len(sequence) - len(ids)
    result = {"tokens": pieces,
              "token_logprobs": [floor if floor > token.logprob else token.logprob for token in tokens],
              "top_logprobs": [{texts.at(t, sequence, index + shift): floor if floor > lp else lp
                                for t, lp in token.top[:top]} for index, token in enumerate(tokens)]}
    if first_token is not None:  # an echoed prompt's first token: nothing before it to condition on
        pieces.insert(0, first_token)
        result["token_logprobs"].insert(0, None)
        result["top_logprobs"].insert(0, None)
    result["text_offset"] = list(itertools.accumulate(map(len, pieces[:-1]), initial=offset)) if pieces else []
    return result


def _join_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in first}


def _completion_events(answer, prompts, generations, echoed, include_usage) -> Iterator[dict]:
    engine, params = answer.engine, answer.params
    answer.prompt_tokens = sum(len(ids) for ids in prompts)
    for prompt_index, generation in enumerate(generations):
        if echoed:
            prompt_text, prompt_logprobs = echoed[prompt_index]
            for choice in range(params.n):
                yield answer.chunk([{"index": prompt_index * params.n + choice, "text": prompt_text,
                                     "logprobs": prompt_logprobs, "finish_reason": None}])
        sent = {choice: len(echoed[prompt_index][0]) if echoed else 0 for choice in range(params.n)}
        # each choice's last token ids: a token is named as it reads after them
        recent = dict.fromkeys(range(params.n), prompts[prompt_index][-UTF8_MAX_BYTES:])
        for delta in generation:
            answer.completion_tokens += len(delta.token_ids)
            if not (delta.text or delta.finish_reason or delta.logprobs):
                continue
            logprobs = None
            if params.logprobs is not None:
                logprobs = _completion_logprobs(engine, delta.logprobs or [], sent[delta.choice],
                                                before=recent[delta.choice])
            sent[delta.choice] += len(delta.text)
            recent[delta.choice] = [*recent[delta.choice], *delta.token_ids][-UTF8_MAX_BYTES:]
            yield answer.chunk([{"index": prompt_index * params.n + delta.choice, "text": delta.text,
                                 "logprobs": logprobs, "finish_reason": delta.finish_reason}])
    if include_usage:
        yield answer.chunk([], usage=answer.usage())


# -- /v1/chat/completions ----------------------------------------------------------------------------------------


@openai_api.post("/chat/completions")
def chat_completions():
    request = parse_body(ChatCompletionRequest, read_json_body(), "/v1/chat/completions")
    engine = current_engine()
    check_model_name(engine, request.model)
    tool_use = ToolUse.of(request)
    prompt = chat_prompt_ids(engine, request, tool_use.template_tools())
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    # Without a limit, the answer may fill what the context leaves after the prompt.
    params = _sampling_params(engine, request,
                              limit if limit is not None else max(1, engine.max_model_len - len(prompt)), logprobs,
                              tool_use.checked_constraint(engine))
    prompt_ids = encode_prompt(engine, prompt, params)
    output = ChatOutput(tool_use, prompt_ids, engine.tokenizer, request.include_reasoning, request.template_kwargs())
    admit()
    # vLLM's: the rendered conversation's log-probabilities, as a completion choice carries a prompt's (whole answers)
    scored = None
    if request.prompt_logprobs is not None:
        [scored] = engine.prompt_logprobs([prompt_ids], top=request.prompt_logprobs, deadline=deadline())
    generation = start_generation(engine, prompt_ids, params)
    answer = _Answer("chatcmpl", "chat.completion", engine, params, request.request_id)
    answer.prompt_tokens = len(prompt_ids)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _event_stream(_chat_events(answer, generation, output, include_usage), [generation])
    choices = []
    for choice, result in enumerate(generation.collect()):
        answer.completion_tokens += len(result.token_ids)
        message, finish_reason = output.message(result.text, result.token_ids, result.finish_reason)
        choices.append({
            "index": choice,
            "message": message,
            "logprobs": _chat_logprobs(engine, result.logprobs or []) if logprobs is not None else None,
            "finish_reason": finish_reason,
        })
    body = {**answer.head(), "choices": choices, "usage": answer.usage()}
    if scored is not None:
        body["prompt_logprobs"] = _prompt_logprobs(engine, prompt_ids, scored, request.prompt_logprobs)
    return jsonify(body)


def chat_prompt_ids(engine: Engine, request: ChatTemplateControls, tools: list[dict] | None = None) -> list[int]:
    """The request's messages (and tools) through the chat template, tokenized (also /tokenize's)."""
    conversation = [message.for_template() for message in request.messages]
    try:
        text = engine.tokenizer.apply_chat_template(
            conversation, tools=tools, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message, documents=request.documents, tokenize=False,
            **request.template_kwargs())
    except Exception as error:  # noqa: BLE001 - a template that refuses this conversation is the client's problem
        raise RequestError(f"the model's chat template rejected the messages: {error}", "messages") from None
    # By default the template alone writes the special tokens it wants.
    return encode_text(engine, text, request.add_special_tokens, "messages")


def _chat_logprobs(engine: Engine, tokens: list[TokenLogprob], before: Sequence[int] = ()) -> dict:
    """OpenAI's chat `logprobs` object; each token named as it reads after the generated ids before it (`before`:
    those of earlier chunks), as vLLM names them (TokenTexts.in_sequence)."""
    texts = engine.token_texts
    ids = [token.token_id for token in tokens]
    sequence = [*before[-UTF8_MAX_BYTES:], *ids]
    shift = len(sequence) - len(ids)

    def entry(piece: str, logprob: float) -> dict:
        return {"token": piece, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(piece.encode())}

    return {"content": [
        {**entry(piece, token.logprob),
         "top_logprobs": [entry(texts.at(t, sequence, index + shift), lp) for t, lp in token.top]}
        for index, (token, piece) in enumerate(zip(tokens, texts.in_sequence(ids, before), strict=True))
    ]}


def _chat_events(answer, generation: TextGeneration, output: ChatOutput, include_usage: bool) -> Iterator[dict]:
    params = answer.params
    streams = [output.stream() for _ in range(params.n)]
    for choice in range(params.n):
        yield answer.chunk([{"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
    recent: dict[int, list[int]] = dict.fromkeys(range(params.n), [])  # each choice's last ids, to name tokens after
    for delta in generation:
        answer.completion_tokens += len(delta.token_ids)
        before, recent[delta.choice] = recent[delta.choice], [*recent[delta.choice], *delta.token_ids][-UTF8_MAX_BYTES:]
        stream = streams[delta.choice]
        fields = stream.delta(delta.text, delta.token_ids, finished=delta.finish_reason is not None)
        if not (fields or delta.finish_reason or delta.logprobs):
            continue
        logprobs = None
        if params.logprobs is not None:
            logprobs = _chat_logprobs(answer.engine, delta.logprobs or [], before)
        yield answer.chunk([{"index": delta.choice, "delta": fields or {}, "logprobs": logprobs,
                             "finish_reason": stream.finish_reason(delta.finish_reason)}])
    if include_usage:
        yield answer.chunk([], usage=answer.usage())


# -- shared ------------------------------------------------------------------------------------------------------


class _Answer:
    """The id, timestamps and token counts one response carries in every chunk."""

    def __init__(self, prefix: str, kind: str, engine: Engine, params: SamplingParams, request_id: str | None):
        self.id = f"{prefix}-{request_id or uuid.uuid4().hex}"
        self.kind = kind
        self.created = int(time.time())
        self.engine = engine
        self.params = params
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def head(self) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.engine.model_name}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind
        return {**self.head(), "object": kind, "choices": choices, "usage": usage}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _event_stream(events: Iterator[dict], generations: list[TextGeneration]) -> Response:
    def sse():
        try:
            for event in events:
                yield f"data: {encode_json(event)}\n\n"
        except ClientGone:
            return
        except Exception as error:  # noqa: BLE001 - the status is sent already: an error event instead
            yield f"data: {encode_json(error_body(error))}\n\n"
        finally:  # the client left (or the stream ended): nothing it asked for keeps running
            for generation in generations:
                generation.cancel()
        yield "data: [DONE]\n\n"

    # X-Accel-Buffering: a proxy in front (nginx) passes the events on as they come.
    # Within the request's context: errors raised mid-stream are still described with its settings.
    return Response(stream_with_context(sse()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
