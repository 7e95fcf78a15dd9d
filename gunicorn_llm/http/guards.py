"""What a request must pass before any engine work: an API key, a body size, and room in the worker.

- API keys (--api-key, --api-key-file): Bearer authentication on every generation route and the tokenizer's,
  compared in constant time; /health, /ready, /metrics, /workers and the monitor page stay open unless
  --protect-monitoring.
- Body size (--max-body-bytes): larger bodies get 413 before they are read.
- Backpressure (--max-waiting): a worker holding that many requests that have not had a first token refuses the
  next one at once with 503 and Retry-After, rather than letting it queue into a timeout.
"""

from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from gunicorn_llm.http.common import request_stats
from gunicorn_llm.request_schema import RequestError
from gunicorn_llm.settings import ServerSettings

GENERATION_BLUEPRINTS = {"native", "openai", "tokenizer"}


def install_guards(app: Flask, settings: ServerSettings) -> None:
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_WAITING"] = settings.max_waiting
    keys = [key.encode() for key in settings.api_keys()]
    if not keys:
        return

    @app.before_request
    def authenticate():
        if request.blueprint not in GENERATION_BLUEPRINTS and not settings.protect_monitoring:
            return None
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        presented_bytes = presented.strip().encode()
        # Compare with every key, always: the time taken says nothing about which key, or how much of one, matched.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(presented_bytes, key)
        if scheme.lower() != "bearer" or not matched:
            raise RequestError("a valid API key is required: send 'Authorization: Bearer <key>'", None,
                               status=401, error_type="authentication_error",
                               headers={"WWW-Authenticate": "Bearer"})
        return None


def admit() -> None:
    """Take a generation request in as waiting for its first token, or refuse it at once when the worker is full."""
    limit = current_app.config["MAX_WAITING"]
    if not request_stats().admit(limit):
        raise RequestError(
            f"this worker already holds {limit} requests waiting for their first token; retry shortly", None,
            status=503, error_type="overloaded_error", headers={"Retry-After": "1"},
        )
