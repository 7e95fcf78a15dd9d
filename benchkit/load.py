"""The one load loop: client threads that keep requests in flight, back to back.

bench.py's runs, the evaluation harness's load, the soak run and the fault checks' load differ in what one request
is and in when to stop; the threads, the shared work, the deadline and the bookkeeping are this module's.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
FAILURE_PAUSE_S = 0.2  # after a failed request: a client does not spin against a failing server
_END = object()


@dataclass(frozen=True)
class Sent(Generic[Result]):
    client: int
    index: int  # the order in which the requests were started (of the shared work: the item's position)
    started: float  # time.monotonic()
    ended: float
    result: Result


class Clients(Generic[Item, Result]):
    """`clients` threads, each calling `send(client, item)` back to back and keeping what it returns, until the
    shared `work` runs out, `duration_s` passed, or stop().

    Without `work` the load is endless and each client numbers its own requests (the item is 0, 1, 2, ...). With
    `failed`, a client pauses briefly after a result it calls a failure. An exception out of `send` stops every
    client and is raised again by join() or stop()."""

    def __init__(self, send: Callable[[int, Item], Result], clients: int, work: Iterable[Item] | None = None,
                 duration_s: float | None = None, failed: Callable[[Result], bool] | None = None):
        self.send, self.clients, self.failed = send, clients, failed
        self.work = None if work is None else iter(work)
        self.duration_s = duration_s
        self.deadline: float | None = None
        self.sent: list[Sent[Result]] = []  # in the order the requests ended
        self._started = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight: dict[int, float] = {}  # client -> when its current request started
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def _next(self, client: int, own: int) -> tuple[int, Item] | None:
        """The next (index, item) for this client, or None when it should stop."""
        if self._stop.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline):
            return None
        with self._lock:
            if self.work is None:
                return next(self._started), own
            item = next(self.work, _END)
            return None if item is _END else (next(self._started), item)

    def _client(self, client: int) -> None:
        for own in itertools.count():
            taken = self._next(client, own)
            if taken is None:
                return
            index, item = taken
            started = time.monotonic()
            with self._lock:
                self._in_flight[client] = started
            try:
                result = self.send(client, item)
            except BaseException as error:  # noqa: BLE001 - handed to the caller by join()
                with self._lock:
                    self._error = self._error or error
                self._stop.set()
                return
            with self._lock:
                self._in_flight.pop(client, None)
                self.sent.append(Sent(client, index, started, time.monotonic(), result))
            if self.failed is not None and self.failed(result):
                self._stop.wait(FAILURE_PAUSE_S)

    def start(self) -> Self:
        if self.duration_s is not None:
            self.deadline = time.monotonic() + self.duration_s
        for client in range(self.clients):
            thread = threading.Thread(target=self._client, args=(client,), name=f"client-{client}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def in_flight(self) -> dict[int, float]:
        """client -> start time of the request it is waiting for now."""
        with self._lock:
            return dict(self._in_flight)

    def snapshot(self) -> list[Sent[Result]]:
        with self._lock:
            return list(self.sent)

    def join(self, timeout_s: float | None = None) -> list[Sent[Result]]:
        """Wait until every client has ended (each thread up to `timeout_s`); every request sent."""
        self._join(timeout_s)
        if self._error is not None:
            raise self._error
        return self.snapshot()

    def _join(self, timeout_s: float | None) -> None:
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    def alive(self) -> int:
        """Clients still running (after stop() or join() with a timeout: clients that hang)."""
        return sum(thread.is_alive() for thread in self._threads)

    def stop_sending(self) -> None:
        """No new requests; those under way go on."""
        self._stop.set()

    def stop(self, timeout_s: float | None = None) -> list[Sent[Result]]:
        """Stop sending and wait for the requests under way (each thread up to `timeout_s`)."""
        self.stop_sending()
        return self.join(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._join(None)



def send_all(send: Callable[[int, Item], Result], work: Iterable[Item], clients: int) -> list[Result]:
    """`send` over every item from `clients` threads at once; the results in the items' order."""
    return [sent.result for sent in sorted(Clients(send, clients, work).start().join(), key=lambda s: s.index)]
