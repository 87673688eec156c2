"""Server-side dynamic batching over one or more engine streams.

Concurrent requests queue up; each engine stream is a thread that takes its next batch (up to
``max_batch_size`` images) from the queue itself, so the event loop keeps accepting requests while the engine
computes.

Streams: on a small CPU, one ONNX Runtime run that spreads a batch over all cores (intra-op
parallelism) gives the lowest latency for a lone request, but under load two single-threaded runs
side by side get more images through: no barrier between threads that the HTTP/gRPC servers keep
interrupting (measured on 2 AVX2 cores: 41 vs 33 img/s int8). So with ``streams`` > 1:

- a request that finds the engine idle, nobody else waiting, and the batcher lightly used of late (fewer than
  :data:`WIDE_BELOW_OCCUPANCY` requests in it on average over the last :data:`OCCUPANCY_TIME_CONSTANT_S`) runs
  *wide* (``run_wide``: all threads);
- otherwise batches run *narrow* (``run``: one thread each), up to ``streams`` of them at once, and
  the queued requests are spread over the free streams.

Why the recent occupancy and not only "idle now": behind a transformer, a closed loop of clients keeps one or
two requests in the predictor while the next ones are being decoded, so the engine is often idle for the
instant a request arrives although it is busy most of the time. A wide run then costs about 10 % more CPU per
image than a narrow one (threads meeting at barriers while the decoders run on the same cores) and leaves
the other stream idle: measured on 2 Zen 5 cores, 16 clients through the transformer, 91 % of the engine runs
were wide before this rule.

Batches of one on side-by-side streams: a single-threaded stream gains nothing from a batch on a CPU (2 Zen 5
cores, OpenVINO int8, two streams: 15.2 ms of CPU per image at batches of one, 16.1 at four), and a batch makes
its requests wait for each other while the other stream may be about to free up. Measured on the predictor
alone at 16 gRPC requests in flight: the same throughput, p99 160-169 ms against 201-211 ms with batches
spread over the free streams. A single stream (one engine on all threads, as on a GPU) still takes whatever
is waiting, up to ``max_batch_size``.

With ``max_delay_s`` > 0 a batch additionally waits that long for company before it starts -- useful
only when the engine gains much from larger batches, which a CPU ResNet-50 barely does.

The queue holds no more than the requests the server admitted (:mod:`serving.admission`). Each item
carries its request's deadline: one whose deadline passed while it waited, or whose caller went
away (its future is cancelled), is dropped before it reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serving.errors import DeadlineExceeded, ShuttingDown
from serving.metrics import BATCH_SIZE, BATCH_WAIT, ENGINE_RUNS, ENGINE_TIME, reject_count

log = logging.getLogger(__name__)

Engine = Callable[[np.ndarray], tuple[np.ndarray, ...]]

#: a lone request runs on all threads only while the batcher held fewer requests than this, on average, of late
WIDE_BELOW_OCCUPANCY = 1.0
#: the time constant of that average (seconds): a few dozen requests at the served rates
OCCUPANCY_TIME_CONSTANT_S = 0.5


class Occupancy:
    """Requests in the batcher (queued or running) now, and their time-weighted mean, decaying exponentially."""

    def __init__(self, time_constant_s: float = OCCUPANCY_TIME_CONSTANT_S, clock=time.monotonic):
        self.time_constant_s = time_constant_s
        self.clock = clock
        self.current = 0
        self._mean = 0.0
        self._at = clock()

    def _advance(self) -> None:
        now = self.clock()
        elapsed, self._at = now - self._at, now
        if elapsed > 0:
            self._mean += (1.0 - math.exp(-elapsed / self.time_constant_s)) * (self.current - self._mean)

    def add(self, n: int) -> None:
        self._advance()
        self.current += n

    def recent(self) -> float:
        self._advance()
        return self._mean


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic()
    queued: float = field(default_factory=time.perf_counter)

    def live(self) -> bool:
        """Still wanted (called on an engine thread): fail it (deadline passed) or skip it (caller gone) otherwise."""
        if self.future.done():
            return False
        if self.deadline is not None and time.monotonic() > self.deadline:
            reject_count("deadline_exceeded")
            self.fail(DeadlineExceeded("while the request waited for the engine"))
            return False
        return True

    def fail(self, exc: BaseException) -> None:
        self._post(None, exc)

    def answer(self, outputs: tuple[np.ndarray, ...]) -> None:
        self._post(outputs, None)

    def _post(self, outputs, exc: BaseException | None) -> None:
        """From an engine thread to the caller's event loop."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, outputs, exc)
        except RuntimeError:  # the loop is closed: nobody waits for this answer any more
            pass


def _settle(future: asyncio.Future, outputs, exc: BaseException | None) -> None:
    """On the event loop: the caller may have gone away (cancelled) in the meantime."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(outputs)


class DynamicBatcher:
    """``await submit(x)`` -> the engine's outputs for exactly the rows of ``x``.

    Each stream is a thread that takes its next batch from the queue itself as soon as its engine run ends, so
    a stream never waits for the event loop (busy with the servers' parsing and answering under load) to hand
    it work, and no executor hop stands between the two: measured on 2 Zen 5 cores, the predictor alone at 16
    gRPC requests in flight, 105-107 img/s when a scheduler task on the event loop dispatched the batches, 108-112
    with the streams taking them.
    """

    def __init__(self, run: Engine, max_batch_size: int = 8, max_delay_s: float = 0.0, streams: int = 1,
                 run_wide: Engine | None = None):
        self.run = run
        self.run_wide = run_wide if streams > 1 else None
        self.streams = max(1, int(streams))
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_s))
        self._pending: deque[_Item] = deque()
        self._changed = threading.Condition()  # guards _pending, _busy, _wide, _closed and the occupancy
        self._busy = 0  # streams running a batch (a wide run holds them all)
        self._wide = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.calls = {"wide": 0, "narrow": 0}
        self.occupancy = Occupancy()

    def _start(self) -> None:
        self._threads = [threading.Thread(target=self._stream, name=f"engine-{k}", daemon=True)
                         for k in range(self.streams)]
        for thread in self._threads:
            thread.start()

    async def submit(self, x: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, ...]:
        """The engine's outputs for the rows of ``x``; ``deadline`` (monotonic) bounds the wait in the queue."""
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), loop, deadline)
        with self._changed:
            if self._closed:
                raise ShuttingDown()
            if not self._threads:
                self._start()
            self._pending.append(item)
            self.occupancy.add(1)
            self._changed.notify()
        try:
            return await item.future
        finally:
            with self._changed:
                self.occupancy.add(-1)

    # -- the streams (engine threads) ----------------------------------------------------------------
    def _take(self) -> tuple[list[_Item], bool] | None:
        """Under the lock: the next batch for a free stream and whether it runs wide; None once closed."""
        while not self._closed and (not self._pending or self._wide):
            self._changed.wait()
        if self._closed:
            return None
        wide = (self.run_wide is not None and self._busy == 0 and len(self._pending) == 1
                and self.occupancy.recent() < WIDE_BELOW_OCCUPANCY)
        if self.max_delay_s > 0:  # asked for: a batch may grow to the maximum while it waits
            cap = self.max_batch_size
        elif self.streams > 1:  # side-by-side streams: one request each (see the module's note)
            cap = 1
        else:  # one stream: what is waiting (at least one image, at most the maximum)
            cap = min(self.max_batch_size, sum(len(it.x) for it in self._pending))
        items = [self._pending.popleft()]
        size = len(items[0].x)
        self._busy += self.streams if wide else 1  # before any wait below: no other stream may go wide meanwhile
        self._wide = wide
        until = time.monotonic() + self.max_delay_s
        while size < cap and not wide:
            if not self._pending:
                remaining = until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._changed.wait(remaining)
                continue
            if size + len(self._pending[0].x) > cap:
                break
            item = self._pending.popleft()
            items.append(item)
            size += len(item.x)
        return items, wide

    def _stream(self) -> None:
        while True:
            with self._changed:
                taken = self._take()
            if taken is None:
                return
            items, wide = taken
            try:
                self._execute([it for it in items if it.live()], wide)  # drop abandoned and late ones
            finally:
                with self._changed:
                    self._busy -= self.streams if wide else 1
                    self._wide = False
                    self._changed.notify_all()

    def _execute(self, items: list[_Item], wide: bool) -> None:
        if not items:
            return
        mode = "wide" if wide else "narrow"
        started = time.perf_counter()
        for it in items:
            BATCH_WAIT.observe(started - it.queued)
        try:  # whatever fails here, the stream's thread lives on: a dead stream would leave requests hanging
            x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
            BATCH_SIZE.observe(len(x))
            outputs = (self.run_wide if wide else self.run)(x)
        except Exception as exc:  # the engine failed: every waiting request learns why
            log.exception("engine call failed for a batch of %d requests", len(items))
            for it in items:
                it.fail(exc)
            return
        ENGINE_TIME.observe(time.perf_counter() - started)
        ENGINE_RUNS.labels(mode=mode).inc()
        self.calls[mode] += 1
        start = 0
        for it in items:
            stop = start + len(it.x)
            it.answer(tuple(o[start:stop] for o in outputs))
            start = stop

    def close(self) -> None:
        """Stop taking batches; whatever still waits learns so at once (a 503, never a hung request)."""
        with self._changed:
            self._closed = True
            waiting, self._pending = list(self._pending), deque()
            self._changed.notify_all()
        for item in waiting:
            item.fail(ShuttingDown())
