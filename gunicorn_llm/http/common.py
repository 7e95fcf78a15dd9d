"""What every route shares: the worker's engine, the JSON body, prompt encoding, and the one error shape.

Routes live in native_api.py (/infer, /generate), openai_api.py (/v1) and tokenizer_api.py (/tokenize, ...); the app
that holds them in app.py.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flask import Response, current_app, g, jsonify, request
from pydantic import BaseModel, ValidationError

from gunicorn_llm.engines.base import DeadlineExceeded, Engine, EngineBusy
from gunicorn_llm.engines.generation import TextGeneration
from gunicorn_llm.engines.token_controls import bad_words_token_ids
from gunicorn_llm.http.unhonoured_fields import UNHONOURED, refuse_unhonoured
from gunicorn_llm.ops.metrics import RequestStats
from gunicorn_llm.request_schema import RequestError, SamplingParams, as_request_error

ENGINE_KEY = "llm_engine_slot"

log = logging.getLogger("gunicorn.error")

RequestModel = TypeVar("RequestModel", bound=BaseModel)
_warned_keys: set[tuple[str, str]] = set()


class EngineLoading(Exception):
    """The worker's model is not loaded yet."""


def request_stats() -> RequestStats:
    """The metrics and access-log record of the request being served (opened by app.py)."""
    return g.request_stats


def start_generation(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> TextGeneration:
    """A generation for this request: counted in its stats, stopped at its deadline or when the client leaves."""
    return TextGeneration(engine, prompt_ids, params, request_stats(), deadline(), _connection_open_check())


def _connection_open_check() -> Callable[[], bool] | None:
    """Whether the client is still connected, from a peek at its socket (gunicorn passes it in the environ):
    an orderly close or a reset reads as gone; no data or a pipelined request as still there."""
    connection = request.environ.get("gunicorn.socket")
    if connection is None:
        return None

    def still_open() -> bool:
        try:
            return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    return still_open


def check_prompt_count(count: int) -> None:
    limit = current_app.config["MAX_INSTANCES"]
    if count > limit:
        raise RequestError(f"{count} prompts in one request; at most {limit} are accepted", None)


def deadline() -> float:
    """When this request's time is up (time.monotonic)."""
    return request_stats().started + current_app.config["REQUEST_TIMEOUT"]


def as_http_error(error: Exception) -> RequestError:
    """What the client is told of an error: a request error as it is, a past deadline as a 504, an engine busy for
    it now as a 503 to retry, anything else (the engine failed mid-generation) as a 500 that names it, logged with
    its traceback."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, DeadlineExceeded):
        return RequestError(f"the request took longer than its {current_app.config['REQUEST_TIMEOUT']:g} s "
                            "deadline; its generation was stopped", None, status=504, error_type="timeout_error")
    if isinstance(error, EngineBusy):
        log.warning("request %s %s: %s", request.method, request.path, error)
        return RequestError(str(error), None, status=503, error_type="service_unavailable",
                            headers={"Retry-After": "1"})
    log.error("request %s %s failed", request.method, request.path, exc_info=error)
    return RequestError(f"inference failed: {type(error).__name__}: {error}", None, status=500,
                        error_type="internal_error")


def error_body(error: Exception) -> dict:
    """The error object of any error, for streams that can no longer change their status: their last line/event."""
    error = as_http_error(error)
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.status}}


def current_engine() -> Engine:
    """This worker's engine, waiting for it while it loads (up to the app's configured wait)."""
    engine = current_app.extensions[ENGINE_KEY].wait(current_app.config["ENGINE_LOAD_WAIT_S"])
    if engine is None:
        raise EngineLoading()
    if engine.failure is not None:
        raise RequestError(f"the engine failed ({engine.failure}); this worker is being replaced, retry shortly",
                           None, status=503, error_type="service_unavailable", headers={"Retry-After": "1"})
    return engine


def read_json_body():
    try:
        return json.loads(request.get_data() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"malformed JSON body: {error}") from None


def parse_body(model: type[RequestModel], body: Any, route: str) -> RequestModel:
    """A JSON object validated as `model` (which allows extra keys): a field OpenAI or vLLM defines that this server
    does not honour is refused (unhonoured_fields.py); other keys it does not know are ignored, as vLLM's server
    does, with a warning."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    try:
        parsed = model.model_validate(body)
    except ValidationError as error:
        raise as_request_error(error) from None
    refuse_or_ignore(route, parsed.model_extra or {})
    return parsed


def refuse_or_ignore(route: str, extra: dict[str, Any], prefix: str = "", path: str | None = None) -> None:
    """Keys of a request that its route's model does not define (at `prefix` in the body, on `path` when the route
    has several): a field OpenAI or vLLM defines that this server does not honour is refused where it asks for
    something (unhonoured_fields.py); the others are ignored, as vLLM's server does, with a warning."""
    refuse_unhonoured(route, extra, prefix)
    warn_ignored_keys(path or route, [key for key in extra if key not in UNHONOURED.get(route, {})])


def warn_ignored_keys(route: str, keys: list[str]) -> None:
    """Log keys a route ignores, once per route, key and worker: clients send the same extra keys every time."""
    for key in sorted({(route, key) for key in keys} - _warned_keys):
        log.warning("%s: ignoring unknown key %r (warned once per worker)", *key)
        _warned_keys.add(key)


def encode_prompt(engine: Engine, prompt: str | list[int], params: SamplingParams,
                  add_special_tokens: bool = True) -> list[int]:
    """The prompt's token ids (a list of ids is taken as is), refused when it and `max_tokens` exceed the context."""
    ids = list(prompt) if isinstance(prompt, list) else encode_text(engine, prompt, add_special_tokens)
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    check_token_ids(engine, ids, "prompt")
    if len(ids) + (0 if params.scores_prompt else params.max_tokens) > engine.max_model_len:
        raise RequestError(
            f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: together more than "
            f"the model's context of {engine.max_model_len} tokens",
            "max_tokens",
        )
    return ids


def encode_text(engine: Engine, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
    try:
        text.encode()
    except UnicodeEncodeError:  # JSON may carry a lone surrogate; the tokenizer would fail on it with a TypeError
        raise RequestError(f"{param}: the text is not valid Unicode (it holds a lone surrogate)", param) from None
    return engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def check_token_ids(engine: Engine, ids: Iterable[int], param: str) -> None:
    vocab = len(engine.tokenizer)
    ids = ids if isinstance(ids, list) else list(ids)
    if ids and (min(ids) < 0 or max(ids) >= vocab):  # in C: a prompt's ids are checked on every request
        outside = [token for token in ids if not 0 <= token < vocab]
        named = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
        raise RequestError(f"{param}: token ids must be between 0 and {vocab - 1}, not {named}", param)


def check_token_controls(engine: Engine, params: SamplingParams, prefix: str = "") -> None:
    """Token ids the model does not have, and bad words vLLM would refuse, are the client's 400 before the request is
    admitted; the field is named after `prefix` (e.g. `params.`)."""
    if params.logit_bias:
        check_token_ids(engine, [token for token, _ in params.logit_bias], f"{prefix}logit_bias")
    if params.allowed_token_ids:
        check_token_ids(engine, params.allowed_token_ids, f"{prefix}allowed_token_ids")
    if params.bad_words:
        try:
            bad_words_token_ids(engine.tokenizer, params.bad_words)
        except ValueError as error:
            raise RequestError(f"{prefix}bad_words: {error}", f"{prefix}bad_words") from None


def check_structured_outputs(engine: Engine, params: SamplingParams, field: str | None = None,
                             prefix: str = "structured_outputs") -> None:
    """A structured-output constraint the engine cannot compile is the client's 400, before the request is
    admitted. It names `field`, by default the constraint's own under `prefix` (e.g. `structured_outputs.regex`)."""
    constraint = params.structured_outputs
    if constraint is None:
        return
    try:
        engine.check_structured_outputs(constraint)
    except ValueError as error:
        field = field or f"{prefix}.{constraint.kind}"
        raise RequestError(f"{field}: {error}", field) from None


def check_model_name(engine: Engine, requested: str | None) -> None:
    """A request naming a model must name the one served (OpenAI's and vLLM's 404 otherwise)."""
    if requested is not None and requested != engine.model_name:
        raise RequestError(
            f"The model `{requested}` does not exist; this server serves `{engine.model_name}`.",
            "model", status=404, error_type="not_found_error",
        )


def error_response(status: int, message: str, error_type: str, param: str | None = None) -> tuple[Response, int]:
    """Every error this server sends, in OpenAI's shape."""
    return jsonify({"error": {"message": message, "type": error_type, "param": param, "code": status}}), status


def request_error_response(error: Exception) -> tuple[Response, int]:
    error = as_http_error(error)
    response, status = error_response(error.status, error.message, error.error_type, error.param)
    response.headers.update(error.headers)
    return response, status
