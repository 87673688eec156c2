"""Admission control, request deadlines and draining, shared by the REST and gRPC fronts.

- :class:`Admission` admits a request when it can expect an answer within its latency budget, and refuses
  it at once otherwise (:class:`~serving.errors.Overloaded`): the queue a process holds is as deep as its
  measured service rate times the budget, so it follows the machine and the load instead of a fixed count.
  Under overload the requests it accepts still get their answer in about the budget; the others learn at
  once that they should retry (elsewhere). While draining it refuses everything new
  (:class:`~serving.errors.ShuttingDown`) and can wait for the requests in flight, or cancel them when the
  drain time is up.
- Each admitted request runs with a deadline (a ``contextvars`` value, so it follows the request
  into kserve's model code and the batcher without being passed around): the client's gRPC
  deadline, the ``x-request-timeout-ms`` header (also Envoy/Istio's ``x-envoy-expected-rq-timeout-ms``),
  or the server's default.

The policy (Little's law, as a deadline-aware queue does it; Triton's queue policy is the model):

- service rate X: requests completed per second of busy time (time with at least one request in flight),
  over the last :data:`RATE_WINDOW` completions;
- budget B, for the 99th percentile of the accepted requests' latency: ``latency_budget_s`` when set;
  otherwise, with ``auto_budget``, twice the 99th percentile of the latencies of the last requests served alone
  (they found the process idle and no other request came in before they left: its unloaded latency), so that
  under overload an accepted request's p99 is at most twice the unloaded one; otherwise none (the predictor:
  the transformers in front of it bound their queues already, and it needs a queue to batch);
- spread S: the 99th percentile of the recent accepted latencies over their mean (1 to :data:`MAX_SPREAD`;
  1 until :data:`MIN_SPREAD_SAMPLES` are known). By Little's law a queue held at depth L has a mean latency of
  L / X, and its 99th percentile about S times that;
- limit = max(``min_inflight``, floor(X x B / S)), never above ``max_inflight`` (a hard bound for memory).
  While the limit binds, X is the rate at that depth: if deeper queues serve faster (batching), the limit
  grows; once the engine is saturated, X stops growing and the limit settles where the p99 meets B;
- deadline-aware: a request whose own deadline is shorter than its expected time (in flight + 1) / X is
  refused at once, rather than accepted and timed out;
- until X is measured (fewer than :data:`MIN_RATE_SAMPLES` completions) it is taken as ``min_inflight`` requests
  per unloaded latency (from the first request that found the process idle); before even that, the limit is
  ``max_inflight`` under a budget the operator set (a fresh replica joining under load refuses nothing it may
  queue) and ``min_inflight`` under the automatic one (whose budget is not known yet either).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import statistics
import time
from collections import deque

import numpy as np

from serving.errors import Overloaded, RequestRejected, ShuttingDown
from serving.metrics import ADMISSION_BUDGET, ADMISSION_LIMIT, INFLIGHT, SERVICE_RATE, reject_count

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



#: completions the service rate is measured over (about a second at the served rates)
RATE_WINDOW = 32
MIN_RATE_SAMPLES = 8
#: latencies of requests served alone: their median is the unloaded latency, their 99th percentile its tail
UNLOADED_WINDOW = 128
#: accepted latencies the spread (p99 / mean) is measured over, and how many it needs
SPREAD_WINDOW = 256
MIN_SPREAD_SAMPLES = 64
MAX_SPREAD = 3.0
#: the automatic budget, in unloaded 99th percentiles: an accepted request waits about as long as it is served
AUTO_BUDGET_FACTOR = 2.0


class ServiceEstimate:
    """The measured service rate (completions per busy second) and unloaded latency of one process."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.busy_clock = 0.0  # seconds with at least one request in flight
        self._last_event = clock()
        self._completions: deque[float] = deque(maxlen=RATE_WINDOW)  # busy_clock at each completion
        self._unloaded: deque[float] = deque(maxlen=UNLOADED_WINDOW)  # latencies of requests served alone
        self._latencies: deque[float] = deque(maxlen=SPREAD_WINDOW)  # latencies of every accepted request
        # derived from the windows once per completion, not on every admission decision (refusals included)
        self._spread: float | None = None
        self._unloaded_p99: float | None = None

    def tick(self, inflight_before: int) -> float:
        now = self.clock()
        if inflight_before > 0:
            self.busy_clock += now - self._last_event
        self._last_event = now
        return now

    def completed(self, latency_s: float | None, alone: bool) -> None:
        self._completions.append(self.busy_clock)
        if latency_s is not None:
            self._latencies.append(latency_s)
            self._spread = None
            if alone:
                self._unloaded.append(latency_s)
                self._unloaded_p99 = None

    def rate(self) -> float | None:
        """Requests per busy second over the recent completions, None until there are enough."""
        if len(self._completions) < MIN_RATE_SAMPLES:
            return None
        span = self._completions[-1] - self._completions[0]
        return (len(self._completions) - 1) / span if span > 0 else None

    def unloaded_latency(self) -> float | None:
        return statistics.median(self._unloaded) if self._unloaded else None

    def unloaded_p99(self) -> float | None:
        if self._unloaded_p99 is None and self._unloaded:
            self._unloaded_p99 = _p99(self._unloaded)
        return self._unloaded_p99

    def spread(self) -> float:
        """The recent accepted latencies' 99th percentile over their mean (1 until enough are known)."""
        if len(self._latencies) < MIN_SPREAD_SAMPLES:
            return 1.0
        if self._spread is None:
            p99, mean = _p99(self._latencies), statistics.fmean(self._latencies)
            self._spread = min(MAX_SPREAD, max(1.0, p99 / mean)) if mean > 0 else 1.0
        return self._spread


def _p99(values) -> float:
    """The 99th percentile, nearest rank (one of the values)."""
    return float(np.quantile(np.fromiter(values, dtype=np.float64), 0.99, method="inverted_cdf"))


class Admission:
    """Admit what can be answered within the latency budget; refuse the rest at once; drain on shutdown.

    ``max_inflight`` bounds memory whatever the estimate says; ``min_inflight`` requests are always admitted
    (the CPUs the process may use: no fewer than a fixed limit of that size would take).
    """

    def __init__(self, max_inflight: int, role: str = "", *, min_inflight: int | None = None,
                 latency_budget_s: float | None = None, auto_budget: bool = False, clock=time.monotonic):
        self.max_inflight = max(1, int(max_inflight))
        self.min_inflight = min(self.max_inflight, max(1, int(min_inflight or self.max_inflight)))
        self.latency_budget_s = latency_budget_s
        self.auto_budget = auto_budget
        self.role = role
        self.inflight = 0
        self.draining = False
        self.estimate = ServiceEstimate(clock)
        self._admitted: dict = {}  # task -> (admitted at, admission number if it found the process idle)
        self._admissions = 0
        self._tasks: set[asyncio.Task] = set()
        self._idle: asyncio.Event | None = None

    # -- the policy ------------------------------------------------------------------------------------
    def budget(self) -> float | None:
        """The latency budget in seconds, or None (refuse only by count and by each request's deadline)."""
        if self.latency_budget_s is not None:
            return self.latency_budget_s
        if self.auto_budget:
            tail = self.estimate.unloaded_p99()
            return None if tail is None else AUTO_BUDGET_FACTOR * tail
        return None

    def rate(self) -> float | None:
        """The measured service rate; before there is one, a prior from the unloaded latency (the floor's requests
        served side by side in that time), so that a fresh process with a known budget does not sit at the floor
        while its first requests are measured; None when nothing is known yet."""
        rate = self.estimate.rate()
        if rate is None:
            unloaded = self.estimate.unloaded_latency()
            rate = None if not unloaded else self.min_inflight / unloaded
        return rate

    @property
    def limit(self) -> int:
        """Requests admitted at once now: the measured rate times the budget, within the bounds."""
        rate, budget = self.rate(), self.budget()
        if budget is None:  # no budget at all (the predictor), or not measured yet (the floor until it is)
            return self.min_inflight if self.auto_budget else self.max_inflight
        if rate is None:  # nothing measured: an operator's budget trusts the hard bound, an automatic one the floor
            return self.max_inflight if self.latency_budget_s is not None else self.min_inflight
        depth = rate * budget / self.estimate.spread()
        return max(self.min_inflight, min(self.max_inflight, math.floor(depth + 1e-9)))

    def expected_wait(self) -> float | None:
        """Seconds a request admitted now would take, at the measured rate (None before it is known)."""
        rate = self.rate()
        return None if rate is None else (self.inflight + 1) / rate

    def refusal(self, deadline_s: float | None = None):
        """The error a request arriving now would be refused with, or None (counts nothing)."""
        if self.draining:
            return ShuttingDown()
        limit = self.limit
        if self.inflight >= limit:
            return Overloaded(limit, self.budget())
        if deadline_s is not None and self.inflight >= self.min_inflight:
            wait = self.expected_wait()
            if wait is not None and wait > deadline_s:
                return Overloaded(limit, self.budget(), deadline_s=deadline_s, expected_s=wait)
        return None

    # -- entering and leaving --------------------------------------------------------------------------
    def enter(self, task: asyncio.Task | None = None, deadline_s: float | None = None) -> None:
        """Admit one request (raises ShuttingDown or Overloaded, counted, when it cannot be taken).

        ``deadline_s``: the request's own time budget; it is refused at once when it cannot be met."""
        refused = self.refusal(deadline_s)
        if refused is not None:
            reject_count(refused.reason)
            raise refused
        now = self.estimate.tick(self.inflight)
        self._admissions += 1
        self._admitted[task if task is not None else object()] = (now, self._admissions if self.inflight == 0
                                                                  else None)
        self.inflight += 1
        INFLIGHT.set(self.inflight)
        if task is not None:
            self._tasks.add(task)

    def leave(self, task: asyncio.Task | None = None) -> None:
        now = self.estimate.tick(self.inflight)
        admitted = self._admitted.pop(task, None) if task is not None else None
        if admitted is None and task is None and self._admitted:
            # an untracked request (tests, internal callers): the oldest untracked entry
            key = next((k for k in self._admitted if not isinstance(k, asyncio.Task)), None)
            admitted = self._admitted.pop(key) if key is not None else None
        if admitted is not None:
            started, number = admitted
            # alone: it found the process idle and nothing was admitted after it (its latency is the unloaded one)
            self.estimate.completed(now - started, number is not None and number == self._admissions)
        self.inflight = max(0, self.inflight - 1)
        INFLIGHT.set(self.inflight)
        self._publish()
        if task is not None:
            self._tasks.discard(task)
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    def _publish(self) -> None:
        rate, budget = self.estimate.rate(), self.budget()
        ADMISSION_LIMIT.set(self.limit)
        if rate is not None:
            SERVICE_RATE.set(rate)
        if budget is not None:
            ADMISSION_BUDGET.set(budget)

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
