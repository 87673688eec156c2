"""Server-side dynamic batching: concurrent requests share one engine call.

One worker task drains an asyncio queue. The engine runs in a single dedicated thread, so the event
loop keeps accepting requests while a batch computes; whatever queued up meanwhile forms the next
batch (up to ``max_batch_size`` images). With ``max_delay_s`` > 0 a lone request additionally waits
that long for company before the engine starts -- useful only when the engine gains much from larger
batches, which a CPU ResNet-50 barely does (see the benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.metrics import BATCH_SIZE, BATCH_WAIT, ENGINE_TIME

log = logging.getLogger(__name__)


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """``await submit(x)`` -> the engine's outputs for exactly the rows of ``x``."""

    def __init__(self, run: Callable[[np.ndarray], tuple[np.ndarray, ...]], max_batch_size: int = 8,
                 max_delay_s: float = 0.0):
        self.run = run
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_s))
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Item | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.calls = 0

    def _ensure_worker(self) -> asyncio.Queue:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")
        return self._queue

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        queue = self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Item(x, future))
        return await future

    async def _next_batch(self) -> list[_Item]:
        queue = self._queue
        first = self._carry or await queue.get()
        self._carry = None
        items, size = [first], len(first.x)
        deadline = time.perf_counter() + self.max_delay_s
        while size < self.max_batch_size:
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
            if size + len(item.x) > self.max_batch_size:
                self._carry = item  # starts the next batch
                break
            items.append(item)
            size += len(item.x)
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._next_batch()
            items = [it for it in items if not it.future.done()]  # the client gave up
            if not items:
                continue
            started = time.perf_counter()
            for it in items:
                BATCH_WAIT.observe(started - it.queued)
            x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
            BATCH_SIZE.observe(len(x))
            try:
                outputs = await loop.run_in_executor(self._executor, self.run, x)
            except Exception as exc:  # the engine failed: every waiting request learns why
                log.exception("engine call failed for a batch of %d", len(x))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            ENGINE_TIME.observe(time.perf_counter() - started)
            self.calls += 1
            start = 0
            for it in items:
                stop = start + len(it.x)
                if not it.future.done():
                    it.future.set_result(tuple(o[start:stop] for o in outputs))
                start = stop

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
