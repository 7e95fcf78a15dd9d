"""The HTTP layer both engines share: the Flask app factory, `/infer`, `/health`, `/ready` and JSON errors.

The backend modules (`transformers_url_m.py`, `vllm_url_m.py`) only say how to build their engine; everything a
client sees is decided here, once. The engine is built in a background thread so that the worker answers
`/health` (and heartbeats to the gunicorn master) while a large model loads; requests that arrive meanwhile wait
for it. A model that fails to load ends the worker with gunicorn's "app failed to load" status, which stops the
server with a clear message instead of respawning the worker forever.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Callable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from dispatcher import pinned_slice_label
from engine import Engine
from generation import TextGeneration
from request_schema import RequestError, SamplingParams, parse_infer_request

log = logging.getLogger("gunicorn.error")

APP_LOAD_ERROR = 4  # gunicorn's exit status for "app failed to load": the master halts instead of respawning


class EngineSlot:
    """Holds the worker's engine, built once in a background thread."""

    def __init__(self, build: Callable[[], Engine], app: Flask):
        self._ready = threading.Event()
        self.engine: Engine | None = None
        threading.Thread(target=self._build, args=(build, app), name="engine-loader", daemon=True).start()

    def _build(self, build: Callable[[], Engine], app: Flask) -> None:
        try:
            # vLLM's kernel registration probes the globals of every loaded module, Flask's request-local proxies
            # included, which raise outside a request: give the loading thread a (dummy) request context.
            with app.test_request_context():
                self.engine = build()
        except BaseException:
            log.exception("worker %s: the model failed to load; stopping the server", os.getpid())
            sys.stderr.flush()
            os._exit(APP_LOAD_ERROR)
        log.info("worker %s: model loaded on slice %s", os.getpid(), pinned_slice_label())
        self._ready.set()

    def wait(self, timeout_s: float) -> Engine | None:
        return self.engine if self._ready.wait(timeout_s) else None


def read_json_body():
    try:
        return json.loads(request.get_data() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"malformed JSON body: {error}") from None


def encode_prompt(engine: Engine, text: str, params: SamplingParams) -> list[int]:
    """The prompt's token ids, refused with both numbers when it and `max_tokens` exceed the context."""
    ids = engine.tokenizer(text)["input_ids"]
    check_fits(engine, ids, params)
    return ids


def check_fits(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
    if len(prompt_ids) + (0 if params.scores_prompt else params.max_tokens) > engine.max_model_len:
        raise RequestError(
            f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: together more than "
            f"the model's context of {engine.max_model_len} tokens",
            "max_tokens",
        )


def _infer_lines(generations: list[TextGeneration]):
    """The streaming /infer answer: one JSON object per line and text delta, instance by instance."""
    try:
        for instance, generation in enumerate(generations):
            for delta in generation:
                if delta.text or delta.finish_reason:
                    line = {"instance": instance, "choice": delta.choice, "text": delta.text,
                            "finish_reason": delta.finish_reason}
                    yield json.dumps(line) + "\n"
    finally:  # the client left: nothing it asked for keeps running
        for generation in generations:
            generation.cancel()


def error_response(status: int, message: str, error_type: str, param: str | None = None) -> tuple[Response, int]:
    """Every error this server sends, in OpenAI's shape."""
    return jsonify({"error": {"message": message, "type": error_type, "param": param, "code": status}}), status


def create_app(build_engine: Callable[[], Engine], load_wait_s: float = 300.0) -> Flask:
    """A Flask app serving the engine that `build_engine` returns (called once, in a background thread)."""
    app = Flask(__name__)
    slot = EngineSlot(build_engine, app)
    warned_keys: set[str] = set()

    def ready_engine() -> Engine:
        engine = slot.wait(load_wait_s)
        if engine is None:
            raise EngineLoading()
        return engine

    @app.post("/infer")
    def infer():
        infer_request, ignored = parse_infer_request(read_json_body())
        for key in set(ignored) - warned_keys:
            log.warning("/infer: ignoring unknown params key %r (warned once per worker)", key)
            warned_keys.add(key)
        engine = ready_engine()
        params = infer_request.params
        prompts = [encode_prompt(engine, text, params) for text in infer_request.instances]
        if params.scores_prompt:
            return jsonify([[token.logprob for token in row] for row in engine.prompt_logprobs(prompts)])
        # All instances start before any is read: the engine batches them together.
        generations = [TextGeneration(engine, ids, params) for ids in prompts]
        if infer_request.stream:
            return Response(_infer_lines(generations), mimetype="application/x-ndjson")
        answers = [[choice.text for choice in generation.collect()] for generation in generations]
        return jsonify([choices[0] if params.n == 1 else choices for choices in answers])

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.get("/ready")
    def ready():
        engine = slot.wait(0)
        if engine is None:
            return error_response(503, "the model is still loading", "service_unavailable")
        return jsonify({"status": "ready", "pid": os.getpid(), "slice": pinned_slice_label(), **engine.describe()})

    @app.after_request
    def name_the_worker(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        response.headers["X-GPU-Slice"] = pinned_slice_label()
        return response

    @app.errorhandler(RequestError)
    def bad_request(error: RequestError):
        return error_response(400, error.message, "invalid_request_error", error.param)

    @app.errorhandler(EngineLoading)
    def still_loading(error: EngineLoading):
        response, status = error_response(503, "the model is still loading; retry shortly", "service_unavailable")
        response.headers["Retry-After"] = "5"
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return error_response(error.code or 500, error.description or error.name, _error_type(error.code))

    @app.errorhandler(Exception)
    def engine_failure(error: Exception):
        log.exception("request failed")
        return error_response(500, f"inference failed: {type(error).__name__}: {error}", "internal_error")

    return app


class EngineLoading(Exception):
    """The worker's model is not loaded yet."""


def _error_type(status: int | None) -> str:
    return {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}.get(
        status or 500, "invalid_request_error" if status and status < 500 else "internal_error"
    )
