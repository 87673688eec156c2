"""How every worker of the gateway runs: one pass, then sleep until woken, due, or stopped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def first_of(*events: asyncio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run_passes(name: str, one_pass: Callable[[], Awaitable[bool]], stop: asyncio.Event, wake: asyncio.Event,
                     interval_s: float) -> None:
    """Run ``one_pass`` until ``stop``; it returns True when more work may be due at once. A pass that fails (a
    database briefly away) is logged and the next one comes after ``interval_s``, or when ``wake`` is set.

    ``wake`` is cleared before the pass, never after it: a wake that comes while a pass runs (a film accepted
    while the scorer scores another) starts the next pass at once instead of waiting ``interval_s``."""
    while not stop.is_set():
        wake.clear()
        try:
            if await one_pass():
                continue
        except Exception:
            log.exception("%s: a pass failed; trying again", name)
        try:
            await asyncio.wait_for(first_of(stop, wake), timeout=interval_s)
        except asyncio.TimeoutError:
            pass
