"""The Flask app both engines share: the factory, the engine's background loading, health, readiness, errors.

The engines (`engines/transformers_engine.py`, `engines/vllm_engine.py`) only say how to build and drive a model;
routes live in native_api.py and openai_api.py; everything a client sees is decided above the engines, once. The
engine is built in a background thread so that the worker answers `/health` (and heartbeats to the gunicorn master)
while a large model loads; requests that arrive meanwhile wait for it. A model that fails to load ends the worker
with gunicorn's "app failed to load" status, which stops the server with a clear message instead of respawning the
worker forever.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from collections.abc import Callable

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from gunicorn_llm.engines.base import ClientGone, DeadlineExceeded, Engine
from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME, resolve_model
from gunicorn_llm.engines.output_parsers import load_output_parser, read_chat_template
from gunicorn_llm.http.chat_tools import AUTO_TOOL_CHOICE_KEY, OUTPUT_PARSER_KEY
from gunicorn_llm.http.common import ENGINE_KEY, EngineLoading, error_response, request_error_response
from gunicorn_llm.http.guards import install_guards
from gunicorn_llm.http.json_encoding import MsgspecJSONProvider
from gunicorn_llm.http.native_api import native
from gunicorn_llm.http.openai_api import openai_api
from gunicorn_llm.http.openapi_spec import openapi_json
from gunicorn_llm.http.tokenizer_api import tokenizer_api
from gunicorn_llm.ops import metrics, slice_engines, systemd_notify
from gunicorn_llm.ops.dispatcher import pinned_slice_label
from gunicorn_llm.ops.monitor import monitor
from gunicorn_llm.request_schema import RequestError
from gunicorn_llm.settings import ServerSettings, load_settings

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
        # Everything loading made (modules, the model, the engine's tables) lives as long as the worker: freeze it
        # out of the garbage collector, whose full passes over all of it would otherwise pause every thread of the
        # worker while it serves (vLLM's own server does the same).
        gc.collect()
        gc.freeze()
        log.info("worker %s: model loaded on slice %s", os.getpid(), pinned_slice_label())
        metrics.worker_loaded(pinned_slice_label(), self.engine.engine_core_id)
        self._ready.set()
        systemd_notify.worker_loaded()  # systemd: READY=1 once every worker is loaded

    def wait(self, timeout_s: float) -> Engine | None:
        return self.engine if self._ready.wait(timeout_s) else None


def loaded_engine(app: Flask) -> Engine | None:
    """The app's engine once it has loaded (None before, or for an app create_app did not make)."""
    slot = app.extensions.get(ENGINE_KEY)
    return slot.engine if isinstance(slot, EngineSlot) else None


def app_for(engine_class: type) -> Flask:
    """The WSGI app of a backend module: its engine, built in the worker from the settings, behind create_app."""
    settings = load_settings()

    def build_engine() -> Engine:
        model_path = settings.model_path or str(resolve_model(settings.model_name))
        name = settings.model_name or EMBEDDED_MODEL_NAME
        log.info("worker %s: loading %s from %s", os.getpid(), name, model_path)
        return engine_class(model_path, name, settings)

    return create_app(build_engine, settings)


def create_app(build_engine: Callable[[], Engine], settings: ServerSettings) -> Flask:
    """A Flask app serving the engine that `build_engine` returns (called once, in a background thread)."""
    app = Flask(__name__, static_folder=None)  # the monitor page serves its own files
    app.json = MsgspecJSONProvider(app)
    app.config.update(ENGINE_LOAD_WAIT_S=settings.worker_timeout, REQUEST_TIMEOUT=settings.request_timeout,
                      MAX_INSTANCES=settings.max_instances)
    app.config[AUTO_TOOL_CHOICE_KEY] = settings.enable_auto_tool_choice
    install_guards(app, settings)

    def build() -> Engine:
        engine = build_engine()
        engine.inject_failure_after(settings.fault_inject_after_steps)
        if settings.chat_template:  # every chat rendering (chat completions, /tokenize) goes through the tokenizer
            engine.tokenizer.chat_template = read_chat_template(settings.chat_template)
        # before the engine is handed out: requests find the parsers once they find the engine
        app.extensions[OUTPUT_PARSER_KEY] = load_output_parser(settings, engine.tokenizer)
        return engine

    app.extensions[ENGINE_KEY] = slot = EngineSlot(build, app)
    app.register_blueprint(native)
    app.register_blueprint(openai_api)
    app.register_blueprint(tokenizer_api)
    app.register_blueprint(monitor)
    _log_access_lines_to_stdout()
    metrics.start_gpu_sampler()

    @app.before_request
    def open_request_record():
        rule = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        g.request_stats = metrics.RequestStats(rule, metrics.request_id_from(request.headers.get("X-Request-Id")))

    @app.get("/metrics")
    def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.get("/openapi.json")
    def openapi_description():
        return Response(openapi_json(), mimetype="application/json")

    @app.get("/workers")
    def workers():
        states = metrics.worker_states()
        expected = int(os.environ.get("LLM_EXPECTED_WORKERS", len(states)))
        body = {"workers": expected, "loaded": sum(state["ready"] for state in states), "ready": states}
        if cores := slice_engines.described():  # the slices' shared vLLM engine cores and their supervisors
            body["engine_cores"] = cores
        return jsonify(body)

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.get("/ready")
    def ready():
        engine = slot.wait(0)
        if engine is None:
            return error_response(503, "the model is still loading", "service_unavailable")
        if engine.failure is not None:
            return error_response(503, f"the engine failed ({engine.failure}); this worker is being replaced",
                                  "service_unavailable")
        return jsonify({"status": "ready", "pid": os.getpid(), "slice": pinned_slice_label(), **engine.describe()})

    @app.after_request
    def name_the_worker(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        response.headers["X-GPU-Slice"] = pinned_slice_label()
        engine = slot.engine
        if engine is not None and engine.engine_core_id is not None:
            response.headers["X-Engine-Core"] = engine.engine_core_id  # shared with the slice's other workers
        stats = g.get("request_stats")
        if stats is not None:
            response.headers["X-Request-Id"] = stats.request_id
            # After the last byte: a stream's tokens and duration are known only then.
            response.call_on_close(lambda: stats.close(response.status_code))
        return response

    @app.errorhandler(RequestError)
    @app.errorhandler(DeadlineExceeded)
    def refused(error: Exception):
        return request_error_response(error)

    @app.errorhandler(ClientGone)
    def client_gone(error: ClientGone):
        # Nobody reads this answer; the status (nginx's "client closed request") is for the access line.
        return error_response(499, "the client disconnected; its generation was stopped", "client_closed_request")

    @app.errorhandler(EngineLoading)
    def still_loading(error: EngineLoading):
        response, status = error_response(503, "the model is still loading; retry shortly", "service_unavailable")
        response.headers["Retry-After"] = "5"
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        response, status = error_response(error.code or 500, error.description or error.name, _error_type(error.code))
        # Keep what the error says beyond its body (a 405's Allow), not its HTML content type.
        response.headers.update({k: v for k, v in error.get_headers() if k.lower() != "content-type"})
        return response, status

    @app.errorhandler(Exception)
    def engine_failure(error: Exception):
        return request_error_response(error)  # a 500 naming the error, logged with its traceback

    return app


def _log_access_lines_to_stdout() -> None:
    access = logging.getLogger(metrics.access_log.name)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def _error_type(status: int | None) -> str:
    if status == 404:
        return "not_found_error"
    return "invalid_request_error" if status and status < 500 else "internal_error"
