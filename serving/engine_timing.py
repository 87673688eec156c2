"""Timing the engine candidates on THIS machine: the load the predictor sees under saturation (``streams``
parallel single-threaded calls, or all threads on one call with one stream), in interleaved rounds so that a
neighbour's burst on a shared machine hits them all alike; the median round counts, and a candidate under half
the fastest's rate after the first round (a shorter screening round) is not timed further. Used by
:mod:`serving.engine_selection`."""

from __future__ import annotations

import logging
import statistics
import threading
import time

import numpy as np

from model.bundle import Bundle
from model.engine_gate import GateSet

log = logging.getLogger(__name__)

TIMING_ROUNDS = 3
#: after the first round, candidates under this share of the fastest's rate are not timed further
DROP_BELOW = 0.5
#: the first round is a screening: this share of a round's time is enough to see a candidate at under half the
#: fastest's rate (fp32 beside int8), and the first replica on a machine starts that much sooner
SCREENING_SHARE = 1 / 3


def timing_batch_size(max_batch_size: int) -> int:
    """Per-call batch of the timing runs: what a stream gets under load on a small CPU (the predictor measured
    2.1 images per engine call at 16 in flight on 2 cores), and small enough that one call of a slow candidate
    does not outlast a timing round (batching gains little on a CPU)."""
    return max(1, min(max_batch_size, 2))


def timing_batch(gate: GateSet | None, bundle: Bundle, batch: int) -> np.ndarray:
    size = bundle.preprocess.image_size
    if gate is not None:
        x = gate.tensors(bundle.preprocess)
        return np.ascontiguousarray(np.resize(x, (batch, 1, size, size)))
    return np.zeros((batch, 1, size, size), np.float32)


def time_candidates(candidates: list, x: np.ndarray, streams: int, seconds: float) -> list:
    """Images/s of each candidate (:class:`serving.engine_selection.Candidate`) under the predictor's saturated load, median of interleaved rounds.

    Returns the candidates that ran; one that fails here is out (its status says why)."""
    rates: dict[str, list[float]] = {c.key: [] for c in candidates}
    running = list(candidates)

    def timed(c, budget: float, record: bool = True) -> None:
        try:
            rate = _burst(c, x, streams, budget)
            if record:
                rates[c.key].append(rate)
        except Exception as exc:  # an engine that breaks under load is no candidate
            log.warning("engine %s failed while timed: %s", c.key, exc)
            c.status, c.wide, c.narrow = f"failed while timed: {str(exc).splitlines()[0][:160]}", None, None
            running.remove(c)

    for c in list(running):  # the first call of a shape allocates (and, for OpenVINO, specialises) the graph
        timed(c, 0.0, record=False)
    budget = max(0.05, seconds / TIMING_ROUNDS)
    dropped = []
    for r in range(TIMING_ROUNDS):
        shift = r % max(1, len(running))  # a different candidate leads each round
        for c in running[shift:] + running[:shift]:
            if c in running:
                timed(c, budget * SCREENING_SHARE if r == 0 and len(running) > 1 else budget)
        if r == 0 and len(running) > 1:
            # A candidate at under half the fastest's rate will not catch up: no more time on it (a first start
            # with five candidates then times two or three).
            best = max(rates[c.key][-1] for c in running)
            for c in [c for c in running if rates[c.key][-1] < DROP_BELOW * best]:
                running.remove(c)
                dropped.append(c)
    for c in running + dropped:
        c.img_per_s = statistics.median(rates[c.key])
    return running + dropped


def _burst(c, x: np.ndarray, streams: int, seconds: float) -> float:
    """``streams`` threads calling the narrow engine (or one calling the wide one) for ``seconds``; img/s."""
    engine, workers = (c.narrow, streams) if c.narrow is not None else (c.wide, 1)
    counts, errors = [0] * workers, []
    barrier = threading.Barrier(workers + 1)
    deadline = [0.0]

    def work(k: int) -> None:
        barrier.wait()
        try:
            while True:
                engine.run(x)
                counts[k] += len(x)
                if time.perf_counter() >= deadline[0]:
                    return
        except Exception as exc:  # reported to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / max(time.perf_counter() - started, 1e-9)
