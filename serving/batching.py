"""Server-side dynamic batching over one or more engine streams.

Concurrent requests queue up; a scheduler task forms batches (up to ``max_batch_size`` images) and
runs them in worker threads, so the event loop keeps accepting requests while the engine computes.

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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    deadline: float | None = None  # time.monotonic()
    queued: float = field(default_factory=time.perf_counter)

    def live(self) -> bool:
        """Still wanted: fail it (deadline passed) or skip it (caller gone) otherwise."""
        if self.future.done():
            return False
        if self.deadline is not None and time.monotonic() > self.deadline:
            reject_count("deadline_exceeded")
            self.future.set_exception(DeadlineExceeded("while the request waited for the engine"))
            return False
        return True


class DynamicBatcher:
    """``await submit(x)`` -> the engine's outputs for exactly the rows of ``x``."""

    def __init__(self, run: Engine, max_batch_size: int = 8, max_delay_s: float = 0.0, streams: int = 1,
                 run_wide: Engine | None = None):
        self.run = run
        self.run_wide = run_wide if streams > 1 else None
        self.streams = max(1, int(streams))
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_s))
        self._queue: asyncio.Queue[_Item] | None = None
        self._scheduler: asyncio.Task | None = None
        self._carry: _Item | None = None
        self._free = self.streams
        self._slot_freed: asyncio.Event | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="engine")
        self.calls = {"wide": 0, "narrow": 0}
        self.occupancy = Occupancy()

    def _ensure_scheduler(self) -> asyncio.Queue:
        if self._scheduler is None or self._scheduler.done():
            self._queue = asyncio.Queue()
            self._slot_freed = asyncio.Event()
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="dynamic-batcher")
        return self._queue

    async def submit(self, x: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, ...]:
        """The engine's outputs for the rows of ``x``; ``deadline`` (monotonic) bounds the wait in the queue."""
        queue = self._ensure_scheduler()
        future = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Item(x, future, deadline))
        self.occupancy.add(1)
        try:
            return await future
        finally:
            self.occupancy.add(-1)

    # -- scheduling ----------------------------------------------------------------------------------
    def _waiting(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    async def _next_batch(self, cap: int) -> list[_Item]:
        queue = self._queue
        first = self._carry or await queue.get()
        self._carry = None
        items, size = [first], len(first.x)
        deadline = time.perf_counter() + self.max_delay_s
        while size < cap:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(item.x) > cap:
                self._carry = item  # starts the next batch
                break
            items.append(item)
            size += len(item.x)
        return items

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._free < 1:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            if not self._waiting():
                item = await self._queue.get()  # idle: wait for the next request
                self._carry = item
            # Spread what is waiting over the free streams (at least one image, at most the maximum);
            # with a delay, a batch may grow to the maximum while it waits.
            spread = max(1, math.ceil(self._waiting() / self._free))
            cap = self.max_batch_size if self.max_delay_s > 0 else min(self.max_batch_size, spread)
            items = [it for it in await self._next_batch(cap) if it.live()]  # drop abandoned and late ones
            if not items:
                continue
            wide = (self.run_wide is not None and self._free == self.streams and not self._waiting()
                    and self.occupancy.recent() < WIDE_BELOW_OCCUPANCY)
            slots = self.streams if wide else 1
            self._free -= slots
            task = loop.create_task(self._execute(items, self.run_wide if wide else self.run, slots,
                                                  "wide" if wide else "narrow"))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, items: list[_Item], engine: Engine, slots: int, mode: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            started = time.perf_counter()
            for it in items:
                BATCH_WAIT.observe(started - it.queued)
            x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
            BATCH_SIZE.observe(len(x))
            try:
                outputs = await loop.run_in_executor(self._executor, engine, x)
            except Exception as exc:  # the engine failed: every waiting request learns why
                log.exception("engine call failed for a batch of %d", len(x))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                return
            ENGINE_TIME.observe(time.perf_counter() - started)
            ENGINE_RUNS.labels(mode=mode).inc()
            self.calls[mode] += 1
            start = 0
            for it in items:
                stop = start + len(it.x)
                if not it.future.done():
                    it.future.set_result(tuple(o[start:stop] for o in outputs))
                start = stop
        finally:
            self._free += slots
            self._slot_freed.set()

    def close(self) -> None:
        """Stop scheduling; whatever still waits learns so at once (a 503, never a hung request)."""
        if self._scheduler is not None:
            self._scheduler.cancel()
        waiting = [self._carry] if self._carry is not None else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(ShuttingDown())
        self._executor.shutdown(wait=False, cancel_futures=True)
