"""A bounded load generator for the fault tests: N client threads sending generation requests in a loop.

Every request is recorded with its outcome: the HTTP status, or the name of the exception the client got
(`ConnectionError`, `ReadTimeout`, ...). Each request has a client timeout, so a server that hangs shows up as a
`ReadTimeout`/`ConnectTimeout` outcome instead of stalling the test; the whole run is bounded by `max_s`.
Every request opens a fresh connection (as `requests.post` does), like the evaluation toolkit's clients.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Self

import requests

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
    """`clients` threads posting to `route` until stop() (or `max_s`, or `max_requests` per client)."""

    def __init__(self, url: str, clients: int = 6, route: str = "/infer", max_tokens: int = 8,
                 timeout_s: float = 60.0, max_s: float = 120.0, max_requests: int | None = None,
                 pause_s: float = 0.0):
        self.url = url
        self.clients = clients
        self.route = route
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_s = max_s
        self.max_requests = max_requests
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._in_flight: dict[int, float] = {}  # client -> when its current request started

    def _body(self, client: int, n: int) -> dict:
        prompt = f"Client {client}, request {n}: count on from {n}, {n + 1},"
        if self.route == "/v1/completions":
            return {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": self.max_tokens,
                    "temperature": 0, "ignore_eos": True}
        return {"instances": [prompt], "params": {"temperature": 0, "max_tokens": self.max_tokens,
                                                  "ignore_eos": True}}

    def _client(self, client: int) -> None:
        deadline = time.monotonic() + self.max_s
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.max_requests is not None and n >= self.max_requests:
                break
            started = time.monotonic()
            with self._lock:
                self._in_flight[client] = started
            status = error = worker = slice_ = None
            try:
                response = requests.post(self.url + self.route, json=self._body(client, n),
                                         timeout=(10, self.timeout_s))
                status = response.status_code
                worker = int(response.headers["X-Worker-Pid"]) if "X-Worker-Pid" in response.headers else None
                slice_ = response.headers.get("X-GPU-Slice")
            except requests.RequestException as exc:  # connection refused/reset, timeouts: all recorded
                error = type(exc).__name__
            outcome = Outcome(client, started, time.monotonic(), status, error, worker, slice_)
            with self._lock:
                self._in_flight.pop(client, None)
                self.outcomes.append(outcome)
            n += 1
            if outcome.status != 200:  # the server is failing: do not spin
                self._stop.wait(0.2)
            elif self.pause_s:
                self._stop.wait(self.pause_s)

    def start(self) -> Self:
        for client in range(self.clients):
            thread = threading.Thread(target=self._client, args=(client,), name=f"load-{client}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def in_flight(self) -> dict[int, float]:
        """client -> start time of the request it is waiting for now."""
        with self._lock:
            return dict(self._in_flight)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the requests under way (each is bounded by the client timeout), return all."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 15)
        assert not any(thread.is_alive() for thread in self._threads), "a load client did not finish"
        return self.snapshot()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 15)


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
