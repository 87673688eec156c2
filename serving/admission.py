"""Admission control, request deadlines and draining, shared by the REST and gRPC fronts.

- :class:`Admission` holds at most ``limit`` inference requests in flight; one more is refused at
  once (:class:`~serving.errors.Overloaded`), so a backlog never builds up behind a slow engine.
  While draining it refuses everything new (:class:`~serving.errors.ShuttingDown`) and can wait for
  the requests in flight, or cancel them when the drain time is up.
- Each admitted request runs with a deadline (a ``contextvars`` value, so it follows the request
  into kserve's model code and the batcher without being passed around): the client's gRPC
  deadline, the ``x-request-timeout-ms`` header (also Envoy/Istio's ``x-envoy-expected-rq-timeout-ms``),
  or the server's default.
"""

from __future__ import annotations

import asyncio
import contextvars
import time

from serving.errors import Overloaded, RequestRejected, ShuttingDown
from serving.metrics import INFLIGHT, reject_count

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("pneumoscope_deadline", default=None)
#: REST headers that carry the caller's remaining time budget in milliseconds (the smallest wins).
TIMEOUT_HEADERS = ("x-request-timeout-ms", "x-envoy-expected-rq-timeout-ms")


def set_deadline(seconds: float) -> None:
    """This request must be answered within ``seconds`` from now."""
    _DEADLINE.set(time.monotonic() + max(0.0, seconds))


def deadline() -> float | None:
    """The current request's deadline on the ``time.monotonic()`` clock, or None outside a request."""
    return _DEADLINE.get()


def remaining(default: float | None = None) -> float | None:
    """Seconds left before the current request's deadline (``default`` outside a request)."""
    value = _DEADLINE.get()
    return default if value is None else value - time.monotonic()


def timeout_from_headers(headers, default_s: float) -> float:
    """The request's time budget from its headers (capped by ``default_s``); 400 when malformed."""
    budget = default_s
    for name in TIMEOUT_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            ms = float(value)
        except (TypeError, ValueError):
            ms = float("nan")
        if not 0 < ms < 1e9:  # also NaN
            reject_count("invalid_header")
            raise RequestRejected("invalid_header", f"{name} must be a positive number of milliseconds")
        budget = min(budget, ms / 1000.0)
    return budget


class Admission:
    """At most ``limit`` requests in flight; refuse the rest at once; drain on shutdown."""

    def __init__(self, limit: int, role: str = ""):
        self.limit = max(1, int(limit))
        self.role = role
        self.inflight = 0
        self.draining = False
        self._tasks: set[asyncio.Task] = set()
        self._idle: asyncio.Event | None = None

    def enter(self, task: asyncio.Task | None = None) -> None:
        """Admit one request (raises ShuttingDown or Overloaded, counted, when it cannot be taken)."""
        if self.draining:
            reject_count("shutting_down")
            raise ShuttingDown()
        if self.inflight >= self.limit:
            reject_count("overloaded")
            raise Overloaded(self.limit)
        self.inflight += 1
        INFLIGHT.set(self.inflight)
        if task is not None:
            self._tasks.add(task)

    def leave(self, task: asyncio.Task | None = None) -> None:
        self.inflight = max(0, self.inflight - 1)
        INFLIGHT.set(self.inflight)
        if task is not None:
            self._tasks.discard(task)
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    def track(self, task: asyncio.Task) -> None:
        """Cancel ``task`` too if the drain time runs out (the request's worker task)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait up to ``timeout_s`` for those in flight, cancel what is left.

        Returns the number of requests that had to be cancelled (they answer 503 / UNAVAILABLE).
        """
        self.draining = True
        if self.inflight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                pass
        left = [t for t in self._tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5.0)
        return len(left)
