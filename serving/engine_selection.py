"""Which engine x precision serves a bundle on THIS machine: gated for accuracy, then chosen by measurement.

At load (before the predictor reports ready):

1. Candidates: every installed engine (``PNEUMOSCOPE_ENGINE=auto``) or the one forced, times every precision
   the bundle allows (fp32; int8 when its graph passed the int8 export gate; bf16 on OpenVINO where the CPU has
   native bf16) or the one forced with ``PNEUMOSCOPE_PRECISION``.
2. Timing (:mod:`serving.engine_timing`): the candidates run the load the predictor sees under saturation (``streams`` parallel
   single-threaded calls, or all threads on one call with one stream) for a bounded ``engine_timing_s``
   each, in interleaved rounds so that a neighbour's burst on a shared machine hits them all alike; the
   median round counts. A candidate under half the fastest's rate after the first round is not timed further,
   and only the narrow engines are built for timing: a candidate's wide engine (all threads) is built when it
   is gated.
3. The engine parity gate (:mod:`model.engine_gate`), fastest candidate first: it runs the bundle's stored
   validation images and is eligible only if its logits stay within the stored tolerance of the fp32
   reference, its AUC drops by no more than the int8 export gate's limit, its CAMs keep their shape, and its
   out-of-distribution scores stay within the detector's tolerance. The first
   that passes serves; slower ones need no gate (that keeps the start short: gating costs more than timing).
4. The table is logged and exported (Prometheus, v2 ``platform``).

With a :class:`~serving.engine_choice.Choice` (a store and this machine's key), steps 2-3 run once per kind of
machine: a replica that finds a record for its key builds only the recorded candidate and runs the gate on it
("reused"); one that times records what it chose. A recorded candidate that fails the gate here, or is not
available here, is timed again with the others.

A bundle exported before the gate existed carries no gate images: ``auto`` then keeps ONNX Runtime with the
bundle's own precision rule (what earlier releases served); a forced engine runs unchecked, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from model.bundle import Bundle
from model.engine_gate import GateResult, GateSet, check
from serving.engine_choice import Choice
from serving.engine_timing import time_candidates, timing_batch, timing_batch_size
from serving.engine import ENGINES, PLATFORMS, Engine, EngineError, create_engine, installed, native_bf16, require
from serving.metrics import (ENGINE_CANDIDATE_ELIGIBLE, ENGINE_CANDIDATE_SPEED, ENGINE_INFO, ENGINE_SELECTION_SECONDS,
                             ENGINE_TIMING_SECONDS)
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "bf16": "model.onnx"}


@dataclass
class Candidate:
    engine: str
    precision: str
    wide: Engine | None = None
    narrow: Engine | None = None
    gate: GateResult | None = None
    img_per_s: float | None = None
    status: str = ""
    load_s: float = 0.0  # compiling (+ the gate, where it ran)

    @property
    def key(self) -> str:
        return f"{self.engine}/{self.precision}"

    def row(self) -> dict:
        row = {"engine": self.engine, "precision": self.precision, "status": self.status,
               "img_per_s": None if self.img_per_s is None else round(self.img_per_s, 2),
               "load_and_gate_s": round(self.load_s, 2)}
        if self.gate is not None:
            row.update(max_abs_logit_diff=round(self.gate.max_abs_logit_diff, 5), auc_drop=round(self.gate.auc_drop, 5),
                       min_cam_correlation=round(self.gate.min_cam_correlation, 4),
                       max_ood_score_diff=_rounded(self.gate.max_ood_score_diff, 5), gate=self.gate.reason)
        return row


@dataclass
class Selection:
    """The chosen engine objects and the table that chose them."""

    engine: str
    precision: str
    wide: Engine
    narrow: Engine | None
    mode: str  # "auto", "forced", or "reused" (a recorded choice for this kind of machine, gated here)
    gated: bool
    table: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    timing_seconds: float = 0.0  # spent timing candidates (0 when a recorded choice was reused)

    @property
    def platform(self) -> str:
        """The v2 model metadata ``platform``: engine and precision, e.g. ``openvino_onnx/int8``."""
        return f"{PLATFORMS[self.engine]}/{self.precision}"


def _precisions(bundle: Bundle, settings: ServingSettings, engine: str) -> list[str]:
    files = bundle.meta.get("files", {})
    if settings.precision != "auto":
        wanted = [settings.precision]
    else:
        wanted = ["fp32"]
        if GRAPHS["int8"] in files and bundle.meta.get("int8", {}).get("accepted"):
            wanted.append("int8")
        if engine == "openvino" and native_bf16():
            wanted.append("bf16")
    if "int8" in wanted and GRAPHS["int8"] not in files:
        raise EngineError("this model version has no int8 graph (its int8 graph failed the int8 export gate or was "
                          "never made); use precision auto or fp32")
    if engine == "onnxruntime":
        wanted = [p for p in wanted if p != "bf16"]
    return wanted


def candidate_list(bundle: Bundle, settings: ServingSettings) -> list[Candidate]:
    """engine x precision pairs for this bundle, settings and machine (raises EngineError if none)."""
    if settings.engine == "auto":
        engines = [e for e in ENGINES if installed(e)]
    else:
        engines = [settings.engine]
    if settings.precision == "bf16" and not native_bf16():
        raise EngineError("precision bf16 needs OpenVINO on a CPU with native bf16 (AVX512_BF16 or AMX); "
                          "this machine has not both")
    out = [Candidate(e, p) for e in engines for p in _precisions(bundle, settings, e)]
    if not out:
        raise EngineError(f"no engine can run precision {settings.precision} with engine {settings.engine}")
    return out


def select_engine(bundle: Bundle, settings: ServingSettings, model_name: str = "", model_version: str = "",
                  factory=create_engine, choice: Choice | None = None) -> Selection:
    """Time, gate (fastest first) and choose; returns the winner's engines (the others are released).

    ``factory(engine, onnx_path, precision, threads, parallel, spinning)`` builds an engine (tests pass a
    wrapper to plant a broken candidate). ``choice``: where the choice for this kind of machine is recorded
    (:mod:`serving.engine_choice`); None times at every start.
    """
    started = time.perf_counter()
    if settings.engine != "auto":
        require(settings.engine)
    mode = "auto" if settings.engine == "auto" else "forced"
    gate = GateSet.load(bundle)
    candidates = candidate_list(bundle, settings)
    if gate is None:
        candidates = _ungated(bundle, settings, candidates)
    threads, streams = settings.engine_threads(), settings.streams()

    def build(c: Candidate, wide: bool = True) -> None:
        """The engines of a candidate: the narrow streams (what is timed under load) and, unless deferred, the
        wide one (all threads: the gate and lone requests), built only for the candidates that get gated."""
        path = bundle.root / GRAPHS[c.precision]
        if streams > 1 and c.narrow is None:
            c.narrow = factory(c.engine, path, c.precision, 1, streams, settings.spinning)
        if (wide or streams == 1) and c.wide is None:
            c.wide = factory(c.engine, path, c.precision, threads, 1, settings.spinning)

    batch = timing_batch_size(settings.max_batch_size)
    if choice is not None and gate is not None and len(candidates) > 1:
        reused = _reuse(choice, candidates, build, gate, bundle, settings, batch, started)
        if reused is not None:
            _report(reused, [], model_name, model_version, threads, streams, settings)
            return reused
        candidates = candidate_list(bundle, settings)  # fresh: the recorded one may have been built and gated
    log.info("engine selection (%s): %d candidate(s): %s; loading, timing %.1f s each, then gating fastest first "
             "on %s", mode, len(candidates), ", ".join(c.key for c in candidates), settings.engine_timing_s,
             f"{len(gate.labels)} stored val images" if gate is not None else "nothing (no gate set in this bundle)")
    built = []
    for c in candidates:
        t0 = time.perf_counter()
        try:
            build(c, wide=len(candidates) == 1)
        except EngineError:
            if mode == "forced" or len(candidates) == 1:
                raise
            c.status = "unavailable"
            continue
        except Exception as exc:  # an engine that cannot compile this graph here is not a candidate
            c.status = f"failed to load: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
            log.warning("engine %s could not load the bundle: %s", c.key, exc)
            continue
        c.load_s = time.perf_counter() - t0
        built.append(c)
    timing_started = time.perf_counter()
    if len(built) > 1:
        built = time_candidates(built, timing_batch(gate, bundle, batch), streams, settings.engine_timing_s)
    timing_seconds = time.perf_counter() - timing_started

    # Fastest first; the first that passes the gate serves, and nothing slower needs gating.
    chosen = None
    for c in sorted(built, key=lambda c: -(c.img_per_s or 0.0)):
        if chosen is not None:
            c.status = "not gated: slower than the chosen one"
        elif gate is None:
            chosen, c.status = c, "chosen (no gate set in this bundle)"
        else:
            t0 = time.perf_counter()
            log.info("engine selection: gating %s (%.1f img/s)", c.key, c.img_per_s or float("nan"))
            try:
                build(c)  # its wide engine, deferred until now
            except Exception as exc:
                c.status = f"failed to load: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
                log.warning("engine %s could not load the bundle: %s", c.key, exc)
                c.wide = c.narrow = None
                continue
            c.gate = _run_gate(c, gate, bundle, settings.max_batch_size, batch)
            c.load_s += time.perf_counter() - t0
            ENGINE_CANDIDATE_ELIGIBLE.labels(engine=c.engine, precision=c.precision).set(int(c.gate.passed))
            if c.gate.passed:
                chosen, c.status = c, "chosen"
            else:
                c.status = "failed the engine parity gate"
                log.warning("engine %s failed the engine parity gate (outputs vs the fp32 reference on the bundle's "
                            "%d stored val images): %s", c.key, len(gate.labels), c.gate.reason)
        if c is not chosen:
            c.wide = c.narrow = None  # release the compiled graphs of everything that does not serve
    if chosen is None:
        table = "; ".join(f"{c.key}: {c.gate.reason if c.gate else c.status}" for c in candidates)
        raise EngineError(f"no engine passed the engine parity gate on this machine ({table})")
    selection = Selection(chosen.engine, chosen.precision, chosen.wide, chosen.narrow, mode, gate is not None,
                          [c.row() for c in candidates], time.perf_counter() - started, timing_seconds)
    if choice is not None and len(built) > 1:  # a measured choice: later replicas on this kind of machine reuse it
        choice.record(selection.engine, selection.precision, selection.table, selection.seconds)
    _report(selection, candidates, model_name, model_version, threads, streams, settings)
    return selection


def _reuse(choice: Choice, candidates: list[Candidate], build, gate: GateSet, bundle: Bundle,
           settings: ServingSettings, batch: int, started: float) -> Selection | None:
    """The recorded candidate for this kind of machine, built and gated here; None to time them all."""
    record = choice.recorded()
    if record is None:
        return None
    c = next((c for c in candidates if (c.engine, c.precision) == (record["engine"], record["precision"])), None)
    if c is None:
        log.warning("engine choice: the recorded %s/%s is not a candidate here; timing again", record["engine"],
                    record["precision"])
        return None
    log.info("engine selection: reusing %s, chosen on this kind of machine by %s at %s (%s); gating it on %d "
             "stored val images, no timing", c.key, record.get("recorded_by", "?"), record.get("recorded_at", "?"),
             choice.store.where, len(gate.labels))
    t0 = time.perf_counter()
    try:
        build(c)
        c.gate = _run_gate(c, gate, bundle, settings.max_batch_size, batch)
    except Exception as exc:  # could not even build here: time them all
        log.warning("engine choice: the recorded %s cannot load here (%s); timing again", c.key, exc)
        return None
    c.load_s = time.perf_counter() - t0
    ENGINE_CANDIDATE_ELIGIBLE.labels(engine=c.engine, precision=c.precision).set(int(c.gate.passed))
    if not c.gate.passed:
        log.warning("engine choice: the recorded %s failed the engine parity gate here (%s); timing again", c.key,
                    c.gate.reason)
        return None
    recorded = {(r.get("engine"), r.get("precision")): r for r in record.get("table", []) if isinstance(r, dict)}
    c.img_per_s = (recorded.get((c.engine, c.precision)) or {}).get("img_per_s")
    c.status = "chosen (reused: timed on this kind of machine before)"
    table = [c.row()] + [dict(row, status=f"recorded: {row.get('status', '')}", load_and_gate_s=None)
                         for key, row in recorded.items() if key != (c.engine, c.precision)]
    return Selection(c.engine, c.precision, c.wide, c.narrow, "reused", True, table, time.perf_counter() - started,
                     0.0)


def _ungated(bundle: Bundle, settings: ServingSettings, candidates: list[Candidate]) -> list[Candidate]:
    """No gate images in this (older) bundle: nothing can be proven equal to fp32, so nothing is compared."""
    precision = settings.precision if settings.precision != "auto" else (
        "int8" if bundle.onnx_path("auto").name == GRAPHS["int8"] else "fp32")
    engine = "onnxruntime" if settings.engine == "auto" else settings.engine
    log.warning("this model version carries no engine parity gate set (exported before it existed): serving %s %s "
                "without comparing engines; re-export the model to enable engine selection", engine, precision)
    kept = [c for c in candidates if c.engine == engine and c.precision == precision]
    return kept or [Candidate(engine, precision)]


def _run_gate(c: Candidate, gate: GateSet, bundle: Bundle, batch: int, narrow_batch: int) -> GateResult:
    """The wide engine on every gate image; the narrow one (same graph, one thread) on the first few images,
    at the batch size it will be timed with (so the timing does not pay for a first call)."""
    x = gate.tensors(bundle.preprocess)
    try:
        outs = [c.wide.run(x[i:i + batch]) for i in range(0, len(x), batch)]
        result = check(gate, *(np.concatenate([o[k] for o in outs]) for k in range(3)))
        if result.passed and c.narrow is not None:
            n = min(narrow_batch, len(x))
            # Too few images for an AUC: the narrow run must match the reference's logits, CAMs and OOD scores.
            head = dataclasses.replace(gate, images=gate.images[:n], labels=gate.labels[:n], logits=gate.logits[:n],
                                       cams=gate.cams[:n], max_auc_drop=math.inf,
                                       features=None if gate.features is None else gate.features[:n])
            narrow = check(head, *c.narrow.run(x[:n]))
            if not narrow.passed:
                return dataclasses.replace(result, passed=False, reason=f"single-threaded runs: {narrow.reason}")
        return result
    except Exception as exc:  # a candidate that cannot even run the gate images fails it
        nan = float("nan")
        return GateResult(False, f"error on the gate images: {str(exc).splitlines()[0][:160]}", nan, nan, nan, nan,
                          nan)


def _report(selection: Selection, candidates: list[Candidate], model_name: str, model_version: str, threads: int,
            streams: int, settings: ServingSettings) -> None:
    lines = [f"{'engine':<12} {'precision':<9} {'img/s':>8} {'|dlogit|':>9} {'AUC drop':>9} {'CAM r':>6} "
             f"{'|dOOD|':>7} {'load s':>6}  status"]
    if selection.mode == "reused":
        lines += [f"{row['engine']:<12} {row['precision']:<9} {_fmt(row.get('img_per_s'), '.1f'):>8} "
                  f"{_fmt(row.get('max_abs_logit_diff'), '.4f'):>9} {_fmt(row.get('auc_drop'), '+.4f'):>9} "
                  f"{_fmt(row.get('min_cam_correlation'), '.3f'):>6} {_fmt(row.get('max_ood_score_diff'), '.4f'):>7} "
                  f"{_fmt(row.get('load_and_gate_s'), '.1f'):>6}  {row['status']}" for row in selection.table]
    for c in candidates:
        g = c.gate
        lines.append(f"{c.engine:<12} {c.precision:<9} {_fmt(c.img_per_s, '.1f'):>8} "
                     f"{_fmt(g and g.max_abs_logit_diff, '.4f'):>9} {_fmt(g and g.auc_drop, '+.4f'):>9} "
                     f"{_fmt(g and g.min_cam_correlation, '.3f'):>6} {_fmt(g and g.max_ood_score_diff, '.4f'):>7} "
                     f"{c.load_s:>6.1f}  {c.status}"
                     + (f" ({g.reason})" if g is not None and not g.passed else ""))
    log.info("engine selection (%s; timed: %d streams x %d threads, batches of %d; %.1f s in all, %.1f s of "
             "timing):\n%s", selection.mode, streams if streams > 1 else 1, 1 if streams > 1 else threads,
             timing_batch_size(settings.max_batch_size), selection.seconds, selection.timing_seconds,
             "\n".join(lines))
    log.info("serving with %s %s", selection.engine, selection.precision)
    ENGINE_INFO.labels(model_name=model_name, model_version=str(model_version), engine=selection.engine,
                       precision=selection.precision, selection=selection.mode).set(1)
    ENGINE_SELECTION_SECONDS.set(selection.seconds)
    ENGINE_TIMING_SECONDS.set(selection.timing_seconds)
    speeds = {(c.engine, c.precision): c.img_per_s for c in candidates}
    if selection.mode == "reused":  # as measured on this kind of machine by the replica that timed them
        speeds = {(r["engine"], r["precision"]): r.get("img_per_s") for r in selection.table}
    for (engine, precision), speed in speeds.items():
        if isinstance(speed, (int, float)):
            ENGINE_CANDIDATE_SPEED.labels(engine=engine, precision=precision).set(speed)


def _rounded(value: float, digits: int) -> float | None:
    return None if value is None or np.isnan(value) else round(value, digits)


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)
