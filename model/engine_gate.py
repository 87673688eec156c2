"""The engine parity gate: validation X-rays stored WITH the bundle, and the check that every inference
engine and precision must pass, on the serving machine, before it may serve.

At export, :func:`write_gate_set` stores ``gate.npz`` in the bundle folder: up to N validation images (uint8 at
the model resolution, both classes), their labels, and the fp32 ONNX Runtime reference outputs (logits, CAMs
and, with an out-of-distribution detector, the features it reads). ``pneumoscope.json`` records the limits under ``engine_gate``, and the file is hashed like every other
bundle file, so a server can judge a candidate engine without the training data.

A candidate passes when, on those images:

- every output is finite and has the reference's shape;
- max |logit - reference| <= ``max_abs_logit_diff`` (``logit_tolerance`` x the fitted temperature: a bound
  on the change of the calibrated log-odds, so it means the same for every model);
- AUC(reference) - AUC(candidate) <= ``max_auc_drop`` (the int8 export gate's limit);
- every CAM correlates with its reference by at least ``min_cam_correlation`` (the heatmap keeps its shape);
- with a detector (:mod:`model.ood`): max |ood_score - reference| <= ``max_ood_score_diff``, the detector's
  ``score_tolerance`` (a precision that moves scores by less flips the intended-use verdict of at most 1 % of the
  val films).

Not the int8 export gate (:func:`model.export.int8_gate`): that one runs once, at export, and judges the int8
GRAPH by its AUC on all val images; it decides whether the bundle carries an int8 graph at all. This one judges
an engine x precision on the server's own CPU (int8 kernels differ between CPUs) by how closely it reproduces
the fp32 outputs: a kept int8 graph can fail here, and the server then serves fp32.

No torch and no scipy here: the predictor imports this module, and the serving image has neither.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.bundle import BundleError, run_images
from model.ood import OodDetector
from model.preprocessing import PreprocessConfig, normalize

log = logging.getLogger(__name__)

GATE_FILE = "gate.npz"
DEFAULT_GATE_IMAGES = 64
#: in calibrated log-odds; a ResNet-50's static int8 graph moves them by 0.16-0.21 (AVX2, ONNX Runtime and
#: OpenVINO), bf16 by less; a broken graph by far more
DEFAULT_LOGIT_TOLERANCE = 0.3
DEFAULT_MIN_CAM_CORRELATION = 0.9
DEFAULT_MAX_AUC_DROP = 0.003


@dataclass(frozen=True)
class GateSet:
    """The stored gate images, their labels, the fp32 reference outputs and the limits."""

    images: np.ndarray  # uint8 [N, S, S] at the model resolution
    labels: np.ndarray  # 0/1 [N]
    logits: np.ndarray  # float32 [N], fp32 ONNX Runtime
    cams: np.ndarray  # float32 [N, h, w], fp32 ONNX Runtime
    max_abs_logit_diff: float
    max_auc_drop: float
    min_cam_correlation: float
    features: np.ndarray | None = None  # float32 [N, d], fp32 ONNX Runtime (bundles with a detector)
    detector: object | None = None  # model.ood.OodDetector
    max_ood_score_diff: float = float("nan")

    def reference_ood_scores(self) -> np.ndarray | None:
        if self.detector is None or self.features is None:
            return None
        return self.detector.scores(self.features)

    @classmethod
    def load(cls, bundle) -> GateSet | None:
        """The bundle's gate set, or None for a bundle exported before the gate existed."""
        spec = bundle.meta.get("engine_gate")
        if not spec:
            return None
        name = spec.get("file", GATE_FILE)
        arrays = bundle.arrays(name, "the engine parity gate set")
        missing = {"images", "labels", "logits", "cams"} - set(arrays)
        if missing:
            raise BundleError(f"the engine parity gate set {name} lacks {', '.join(sorted(missing))}")
        features = arrays.get("features")
        size = bundle.preprocess.image_size
        n = len(arrays["labels"])
        if arrays["images"].shape != (n, size, size) or arrays["logits"].shape != (n,) or len(arrays["cams"]) != n:
            raise BundleError(f"the engine parity gate set {name} does not match the model ({size} px, {n} labels)")
        detector = OodDetector.load(bundle)
        if detector is not None and (features is None or features.shape != (n, detector.dimensions)
                                     or "max_ood_score_diff" not in spec):
            raise BundleError(f"the engine parity gate set {name} holds no reference features for the bundle's "
                              "out-of-distribution detector")
        return cls(images=arrays["images"], labels=arrays["labels"], logits=arrays["logits"], cams=arrays["cams"],
                   max_abs_logit_diff=float(spec["max_abs_logit_diff"]), max_auc_drop=float(spec["max_auc_drop"]),
                   min_cam_correlation=float(spec["min_cam_correlation"]),
                   features=features if detector is not None else None, detector=detector,
                   max_ood_score_diff=float(spec.get("max_ood_score_diff", float("nan"))))

    def tensors(self, config: PreprocessConfig) -> np.ndarray:
        """The engine input: the stored pixels through the bundle's own normalisation."""
        return normalize(self.images, config)


@dataclass
class GateResult:
    passed: bool
    reason: str
    max_abs_logit_diff: float
    auc_reference: float
    auc: float
    auc_drop: float
    min_cam_correlation: float
    max_ood_score_diff: float = float("nan")  # nan: the bundle has no detector

    def to_dict(self) -> dict:
        return asdict(self)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC over every positive x negative pair, ties one half: the value ``model.metrics.auc`` computes,
    without scipy (the serving image has none); the gate set is small, so comparing all pairs is cheap."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _cam_correlations(cams: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation; images whose reference CAM is flat (no shape to keep) count as 1."""
    a = cams.reshape(len(cams), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    flat = np.linalg.norm(b, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(flat, 1.0, corr)


def check(gate: GateSet, logits: np.ndarray, cams: np.ndarray, features: np.ndarray | None = None) -> GateResult:
    """Judge one candidate's outputs on the gate images against the fp32 reference."""
    logits, cams = np.asarray(logits, dtype=np.float32).reshape(-1), np.asarray(cams, dtype=np.float32)
    nan = float("nan")
    if logits.shape != gate.logits.shape or cams.shape != gate.cams.shape:
        return GateResult(False, f"output shapes logit {logits.shape}, cam {cams.shape} differ from the reference "
                                 f"{gate.logits.shape}, {gate.cams.shape}", nan, nan, nan, nan, nan)
    if not (np.isfinite(logits).all() and np.isfinite(cams).all()):
        return GateResult(False, "non-finite outputs", nan, nan, nan, nan, nan)
    diff = float(np.max(np.abs(logits - gate.logits)))
    auc_ref, auc_cand = auc(gate.labels, gate.logits), auc(gate.labels, logits)
    # One class only (a tiny validation split): no AUC to compare, the logit bound still holds.
    drop = 0.0 if np.isnan(auc_ref) else auc_ref - auc_cand
    cam_corr = float(np.min(_cam_correlations(cams, gate.cams)))
    failures = []
    if diff > gate.max_abs_logit_diff:
        failures.append(f"max |logit diff| {diff:.3g} > {gate.max_abs_logit_diff:.3g}")
    if drop > gate.max_auc_drop:
        failures.append(f"AUC drop {drop:.4f} > {gate.max_auc_drop:.4f}")
    if cam_corr < gate.min_cam_correlation:
        failures.append(f"CAM correlation {cam_corr:.3f} < {gate.min_cam_correlation:.3f}")
    ood_diff = _ood_score_diff(gate, features, failures)
    return GateResult(not failures, "; ".join(failures) or "within the limits", diff, auc_ref, auc_cand,
                      float(drop), cam_corr, ood_diff)


def _ood_score_diff(gate: GateSet, features: np.ndarray | None, failures: list[str]) -> float:
    """Max |ood_score - reference| over the gate images (nan without a detector); appends a failure if too far."""
    reference = gate.reference_ood_scores()
    if reference is None:
        return float("nan")
    features = None if features is None else np.asarray(features, dtype=np.float32)
    if features is None or features.shape != gate.features.shape or not np.isfinite(features).all():
        failures.append(f"features {None if features is None else features.shape} instead of "
                        f"{gate.features.shape}, finite")
        return float("nan")
    diff = float(np.max(np.abs(gate.detector.scores(features) - reference)))
    if diff > gate.max_ood_score_diff:
        failures.append(f"max |ood_score diff| {diff:.3g} > {gate.max_ood_score_diff:.3g}")
    return diff


def choose_gate_images(labels: np.ndarray, count: int = DEFAULT_GATE_IMAGES, seed: int = 0) -> np.ndarray:
    """Indices of up to ``count`` images, half of each class where there are enough (the AUC needs both)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    take = [min(len(p), count // 2) for p in pools]
    spare = count - sum(take)  # a class short of count/2: the other fills up
    for k in (0, 1):
        extra = min(spare, len(pools[k]) - take[k])
        take[k] += extra
        spare -= extra
    return np.sort(np.concatenate([pools[k][:take[k]] for k in (0, 1)])).astype(np.int64)


def write_gate_set(bundle_dir: str | Path, images: np.ndarray, labels: np.ndarray, session,
                   config: PreprocessConfig, temperature: float, max_auc_drop: float = DEFAULT_MAX_AUC_DROP,
                   count: int = DEFAULT_GATE_IMAGES, seed: int = 0, logit_tolerance: float = DEFAULT_LOGIT_TOLERANCE,
                   min_cam_correlation: float = DEFAULT_MIN_CAM_CORRELATION,
                   ood_score_tolerance: float | None = None) -> dict:
    """Store the gate images + fp32 reference outputs in ``bundle_dir``; returns the ``engine_gate`` metadata.

    ``session`` is the fp32 ONNX Runtime session of ``model.onnx`` (the reference every engine must match).
    ``ood_score_tolerance`` (the detector's ``score_tolerance``): store the graph's features too, and make every
    engine keep the out-of-distribution score within it. Call before :func:`model.bundle.write_bundle`, which
    hashes the file.
    """
    chosen = choose_gate_images(labels, count, seed)
    pixels = np.ascontiguousarray(np.asarray(images)[chosen], dtype=np.uint8)
    gate_labels = np.asarray(labels)[chosen].astype(np.int8)
    arrays = {}
    if ood_score_tolerance is None:
        logits, cams = run_images(session, pixels, config, batch_size=16, with_cam=True)
    else:
        logits, cams, features = run_images(session, pixels, config, batch_size=16, with_cam=True, with_features=True)
        arrays["features"] = features.astype(np.float32)
    np.savez_compressed(Path(bundle_dir) / GATE_FILE, images=pixels, labels=gate_labels,
                        logits=logits.astype(np.float32), cams=cams.astype(np.float32), **arrays)
    meta = {"gate": "engine parity gate: at load, each server's engine x precision must reproduce the fp32 "
                    "reference's outputs on these images within these limits",
            "file": GATE_FILE, "n": int(len(chosen)), "positives": int(gate_labels.sum()),
            "reference": "onnxruntime fp32 model.onnx", "logit_tolerance": float(logit_tolerance),
            "max_abs_logit_diff": float(logit_tolerance * temperature), "max_auc_drop": float(max_auc_drop),
            "min_cam_correlation": float(min_cam_correlation)}
    if ood_score_tolerance is not None:
        meta["max_ood_score_diff"] = float(ood_score_tolerance)
    log.info("engine parity gate set: %d val images (%d positive) and their fp32 outputs; a server's engine must "
             "keep |logit diff| <= %.3g, AUC drop <= %.4f, CAM correlation >= %.2f", meta["n"], meta["positives"],
             meta["max_abs_logit_diff"], max_auc_drop, min_cam_correlation)
    return meta
