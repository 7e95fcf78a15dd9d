"""The server's own routes: `/infer` (the evaluation toolkit's contract) and `/generate` (grps-vllm's).

`/vllm-url-infer` is `/infer` under the URL the toolkit's scripts use for a vLLM server: one contract, both engines.
`/infer` takes `{"instances": [...], "params": {...}}` and answers a bare JSON list, or with `"stream": true` one
JSON line per text delta. `/generate` takes `{"prompt", "temperature", "top_p", "max_tokens", ...}`, validated as
protocol.GenerateRequest, and answers the generated text, streamed as it is produced with `?streaming=true` or
`"stream": true`.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request, stream_with_context

from gunicorn_llm.engines.base import ClientGone
from gunicorn_llm.engines.generation import TextGeneration
from gunicorn_llm.http.common import (
    check_prompt_count,
    check_structured_outputs,
    check_token_controls,
    current_engine,
    deadline,
    encode_prompt,
    error_body,
    parse_body,
    read_json_body,
    refuse_or_ignore,
    start_generation,
)
from gunicorn_llm.http.guards import admit
from gunicorn_llm.http.json_encoding import encode_json
from gunicorn_llm.http.protocol import STREAMING_QUERY_VALUES, GenerateRequest
from gunicorn_llm.request_schema import parse_infer_request

log = logging.getLogger("gunicorn.error")

native = Blueprint("native", __name__)


@native.post("/infer")
@native.post("/vllm-url-infer")
def infer():
    infer_request, unknown = parse_infer_request(read_json_body())
    refuse_or_ignore("/infer", unknown, prefix="params.", path=request.path)
    check_prompt_count(len(infer_request.instances))
    engine = current_engine()
    params = infer_request.params
    check_structured_outputs(engine, params, prefix="params.structured_outputs")
    check_token_controls(engine, params, prefix="params.")
    prompts = [encode_prompt(engine, text, params) for text in infer_request.instances]
    admit()
    if params.scores_prompt:
        scores = engine.prompt_logprobs(prompts, deadline=deadline())
        return jsonify([[token.logprob for token in row] for row in scores])
    # All instances start before any is read: the engine batches them together.
    generations = [start_generation(engine, ids, params) for ids in prompts]
    if infer_request.stream:
        return Response(stream_with_context(_infer_lines(generations)), mimetype="application/x-ndjson")
    answers = [[choice.text for choice in generation.collect()] for generation in generations]
    return jsonify([choices[0] if params.n == 1 else choices for choices in answers])


def _infer_lines(generations: list[TextGeneration]):
    """The streaming /infer answer: one JSON object per line and text delta, instance by instance."""
    try:
        for instance, generation in enumerate(generations):
            for delta in generation:
                if delta.text or delta.finish_reason:
                    line = {"instance": instance, "choice": delta.choice, "text": delta.text,
                            "finish_reason": delta.finish_reason}
                    yield encode_json(line) + "\n"
    except ClientGone:
        return
    except Exception as error:  # noqa: BLE001 - the status is sent already: the error is the last line
        yield encode_json(error_body(error)) + "\n"
    finally:  # the client left: nothing it asked for keeps running
        for generation in generations:
            generation.cancel()


@native.post("/generate")
def generate():
    generate_request = parse_body(GenerateRequest, read_json_body(), "/generate")
    stream = generate_request.stream or request.args.get("streaming", "").lower() in STREAMING_QUERY_VALUES
    params = generate_request.sampling_params()
    engine = current_engine()
    check_structured_outputs(engine, params)
    check_token_controls(engine, params)
    prompt_ids = encode_prompt(engine, generate_request.prompt, params)
    admit()
    generation = start_generation(engine, prompt_ids, params)
    if stream:
        return Response(stream_with_context(_text_chunks(generation)), mimetype="text/plain")
    return Response(generation.collect()[0].text, mimetype="text/plain")


def _text_chunks(generation: TextGeneration):
    try:
        for delta in generation:
            if delta.text:
                yield delta.text
    except ClientGone:
        return
    except Exception as error:  # noqa: BLE001 - plain text has no place for an error: the log says it, the text ends
        log.warning("/generate stream ended early: %s", error_body(error)["error"]["message"])
    finally:  # the client left: its generation stops
        generation.cancel()
