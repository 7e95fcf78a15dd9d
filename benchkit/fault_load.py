"""A bounded load for checks that kill, reload or stop servers: N client threads sending generation requests in a loop.

Every request is recorded with its outcome: the HTTP status, or the name of the exception the client got
(`ConnectionError`, `ReadTimeout`, ...). Each request has a client timeout, so a server that hangs shows up as a
`ReadTimeout`/`ConnectTimeout` outcome instead of stalling the check; the whole run is bounded by `max_s`.
Every request opens a fresh connection (as `requests.post` does), like the evaluation toolkit's clients.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Self

import requests

from benchkit.load import Clients
from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME

HANG_OUTCOMES = ("ReadTimeout", "ConnectTimeout", "Timeout")


@dataclass
class Outcome:
    client: int
    started: float  # time.monotonic()
    ended: float
    status: int | None  # the HTTP status, None when the client got an exception
    error: str | None  # the exception's type name
    worker: int | None  # X-Worker-Pid of the answer
    slice: str | None  # X-GPU-Slice of the answer

    @property
    def kind(self) -> str:
        return str(self.status) if self.status is not None else self.error

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def hung(self) -> bool:
        return self.error in HANG_OUTCOMES


class Load:
    """`clients` threads posting to `route` (/infer or /v1/completions) until stop() or `max_s`; `model` names the
    served model on /v1/completions (None: the field left out)."""

    def __init__(self, url: str, clients: int = 6, route: str = "/infer", max_tokens: int = 8,
                 timeout_s: float = 60.0, max_s: float = 120.0, model: str | None = EMBEDDED_MODEL_NAME):
        self.url, self.route, self.max_tokens, self.timeout_s, self.model = url, route, max_tokens, timeout_s, model
        self._clients = Clients(self._send, clients, duration_s=max_s, failed=lambda answer: answer[0] != 200)

    def _body(self, client: int, n: int) -> dict:
        prompt = f"Client {client}, request {n}: count on from {n}, {n + 1},"
        if self.route == "/v1/completions":
            return {**({"model": self.model} if self.model else {}), "prompt": prompt, "max_tokens": self.max_tokens,
                    "temperature": 0, "ignore_eos": True}
        return {"instances": [prompt], "params": {"temperature": 0, "max_tokens": self.max_tokens,
                                                  "ignore_eos": True}}

    def _send(self, client: int, n: int) -> tuple[int | None, str | None, int | None, str | None]:
        """(status, error, worker, slice) of one request."""
        try:
            response = requests.post(self.url + self.route, json=self._body(client, n), timeout=(10, self.timeout_s))
        except requests.RequestException as exc:  # connection refused/reset, timeouts: all recorded
            return None, type(exc).__name__, None, None
        worker = int(response.headers["X-Worker-Pid"]) if "X-Worker-Pid" in response.headers else None
        return response.status_code, None, worker, response.headers.get("X-GPU-Slice")

    def start(self) -> Self:
        self._clients.start()
        return self

    def in_flight(self) -> dict[int, float]:
        """client -> start time of the request it is waiting for now."""
        return self._clients.in_flight()

    def snapshot(self) -> list[Outcome]:
        return [Outcome(sent.client, sent.started, sent.ended, *sent.result) for sent in self._clients.snapshot()]

    def stop_sending(self) -> None:
        """No new requests; those under way go on (stop() waits for them)."""
        self._clients.stop_sending()

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the requests under way (each is bounded by the client timeout), return all."""
        self._clients.stop(timeout_s=self.timeout_s + 15)
        assert not self._clients.alive(), "a load client did not finish"
        return self.snapshot()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self._clients.stop(timeout_s=self.timeout_s + 15)


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    """Outcome kind -> count, e.g. {"200": 120, "ConnectionError": 2}."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.kind] = counts.get(outcome.kind, 0) + 1
    return counts


def longest_gap(outcomes: list[Outcome], start: float, end: float) -> float:
    """The longest time within [start, end] in which no request completed with 200 (the service gap)."""
    times = sorted(o.ended for o in outcomes if o.ok and start <= o.ended <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(edges))
