"""Evaluation: calibrate and pick the threshold on val, report every split with CIs, build the bundle.

Everything is measured through the exported ONNX graph and the shared preprocessing, i.e. through
what will be served, not through the PyTorch module.

The bundle also says what the model is for (``intended_use``: population, views, age limit, training
profile, the held-out figures it is registered with) and carries the out-of-distribution detector
(:mod:`model.ood`): fitted on the training split's features (the graph's third output), its cut-off on val. The report adds,
per split, the refer band's decided-case figures, a risk-coverage curve and the share of films the
detector flags.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from model.bundle import Bundle, make_session, run_images, sha256_file, write_bundle
from model.data import CLASSES, CachedData, DataError, discover
from model.intended_use import DEFAULT_POPULATION, DEFAULT_SOURCE, DEFAULT_VIEWS, DEMONSTRATION_PROFILES
from model.metrics import (abstention_metrics, choose_abstention_band, choose_threshold, fit_calibration,
                           metrics_with_ci, risk_coverage, roc_points, save_plots, save_risk_coverage_plot, sigmoid)
from model.ood import DEFAULT_FLIP_SHARE, DEFAULT_QUANTILE, OodDetector, fit_detector
from model.errors import InvalidImageError
from model.preprocessing import PreprocessConfig, load_resized, normalize

log = logging.getLogger(__name__)

REPORT_SPLITS = ("val", "holdout", "sanity", "test")


@dataclass(frozen=True)
class EvalSettings:
    threshold_method: str = "youden"
    target_sensitivity: float = 0.95
    n_bootstrap: int = 1000
    int8: bool = True
    int8_max_auc_drop: float = 0.003
    calibration_images: int = 128
    gate_images: int = 64  # stored with the bundle: the engine parity gate every serving engine must pass
    seed: int = 0
    refer_target: float = 0.97  # the "refer to a radiologist" band: decided cases reach this sens. AND spec.
    ood: bool = True  # fit the out-of-distribution detector (model.ood) and record the intended use
    ood_quantile: float = DEFAULT_QUANTILE  # the cut-off: this quantile of the val split's distances
    ood_flip_share: float = DEFAULT_FLIP_SHARE  # the engine gate's OOD tolerance: at most this share of val flips
    age_limit_years: float = field(default_factory=lambda: _settings().age_limit_years)
    population: str = DEFAULT_POPULATION
    source: str = DEFAULT_SOURCE
    views: str = DEFAULT_VIEWS
    # An external validation set scored with val's operating point (never fitted on): a folder with labels.csv,
    # e.g. ../shared/data/external_nih_224; empty: none.
    external_data: str = ""


def _settings():
    from model.settings import Settings

    return Settings()


@dataclass(frozen=True)
class OperatingPoint:
    """What val chooses: the calibration (temperature, logit bias), the threshold and the refer band."""

    temperature: float
    bias: float
    threshold: float
    band: tuple[float, float]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits / self.temperature + self.bias)


def evaluate_checkpoint(checkpoint: str | Path, cache_dir: str | Path, out_dir: str | Path,
                        settings: EvalSettings = EvalSettings(), model_name: str = "pneumonia",
                        lung_model: str | Path | None = None) -> dict:
    """Export the checkpoint, choose threshold + temperature on val, score every split.

    Writes ``bundle/`` (the servable model), ``plots/`` and ``report.json``; returns the report. ``lung_model``
    (a ``pneumoscope lungs train`` folder) goes into the bundle and measures the CAM lung share; a model trained
    on lung-cropped pixels takes the one its cache was made with.
    """
    from model.training import load_checkpoint

    started = time.perf_counter()
    out = Path(out_dir)
    bundle_dir = out / "bundle"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    cache = CachedData.load(cache_dir)
    net, meta = load_checkpoint(checkpoint)
    # The checkpoint's preprocessing: the cache's, plus what the recipe added (e.g. a field mask).
    config = PreprocessConfig.from_dict(meta.get("preprocess") or cache.config.to_dict())
    val_idx, val_y = cache.split("val")
    val_images = cache.images[val_idx]
    onnx_path, parity_report = _export_checked(net, config, bundle_dir / "model.onnx", val_images)
    session = make_session(onnx_path)

    val_logits, val_features = run_images(session, val_images, config, with_features=True)
    point = choose_operating_point(val_logits, val_y, settings)
    val_probs = point.probabilities(val_logits)
    detector, ood_meta = _fit_ood(cache, session, config, val_features, settings) if settings.ood else (None, None)
    scored = _score_splits(cache, session, config, point, (val_probs, val_features), settings, detector)
    splits, abstention, split_probs = scored.metrics, scored.abstention, scored.probabilities
    segmenter, lung_meta = bundle_lung_model(cache_dir, cache, config, lung_model, bundle_dir)
    lung_shares, external = _lung_share_and_external(cache, session, config, point, segmenter, settings)
    plots = {k: str(v) for k, v in save_plots(val_y, val_probs, point.threshold, out / "plots", "validation").items()}
    plots["risk_coverage"] = str(save_risk_coverage_plot(scored.risk_coverage, abstention, out / "plots" /
                                                         "risk_coverage.png"))
    int8_report = _int8_export_gate(cache, onnx_path, session, val_images, val_y, config, settings)
    # The held-out split when there is one (val chose the threshold), else val.
    reference_split = "holdout" if "holdout" in split_probs else "val"
    reference = reference_distribution(split_probs[reference_split], point.threshold, reference_split)
    intended_use = _intended_use(meta["profile"]["name"], settings, splits, abstention, reference_split)
    if detector is not None:
        detector.save(bundle_dir)
        ood_meta["flagged_share"] = {s: o["flagged_share"] for s, o in scored.ood.items()}
        intended_use["ood"] = ood_meta
    engine_gate = None
    if settings.gate_images > 0:
        from model.engine_gate import write_gate_set

        engine_gate = write_gate_set(bundle_dir, val_images, val_y, session, config, point.temperature,
                                     settings.int8_max_auc_drop, settings.gate_images, settings.seed,
                                     ood_score_tolerance=ood_meta["score_tolerance"] if detector is not None else None)

    write_bundle(bundle_dir, {
        "model_name": model_name,
        "arch": meta["arch"],
        "preprocess": config.to_dict(),
        "threshold": point.threshold,
        "threshold_method": settings.threshold_method,
        "refer_band": {"low": point.band[0], "high": point.band[1], "target": settings.refer_target,
                       "val_coverage": abstention["val"]["coverage"]},
        "temperature": point.temperature,
        "logit_bias": point.bias,
        "metrics": {s: {k: v for k, v in m.items() if k != "ci95"} for s, m in splits.items() if s in ("val", "holdout")},
        "int8": int8_report,
        "onnx_parity": parity_report,
        "engine_gate": engine_gate,
        "manifest_sha256": cache.summary["manifest_sha256"],
        "training": {"profile": meta["profile"]["name"], "epoch": meta["epoch"], "seed": meta["seed"]},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": reference,
        "intended_use": intended_use,
        **({"lung_segmentation": lung_meta} if lung_meta else {}),
        "cam_lung_share": {name: {k: share["all"].get(k) for k in ("mean", "ci95", "n")} | {"source": share["source"]}
                           for name, share in lung_shares.items()},
    })
    report = {
        "threshold": point.threshold, "threshold_method": settings.threshold_method,
        "temperature": point.temperature, "logit_bias": point.bias, "splits": splits, "abstention": abstention,
        "risk_coverage": scored.risk_coverage, "ood": scored.ood, "intended_use": intended_use,
        "int8": int8_report, "onnx_parity": parity_report, "plots": plots,
        "roc_val": roc_points(val_y, val_probs),
        "reference": reference,
        "cam_lung_share": lung_shares,
        **({"external": external} if external else {}),
        "val_predictions": {"index": val_idx.tolist(), "label": val_y.tolist(), "probability": val_probs.tolist()},
        "manifest_sha256": cache.summary["manifest_sha256"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def bundle_lung_model(cache_dir: str | Path, cache: CachedData, config: PreprocessConfig,
                      lung_model: str | Path | None, bundle_dir: Path):
    """The lung segmentation model that goes into the bundle (copied there as ``lung.onnx``) and its metadata;
    (None, None) without one. A lung-cropped model takes its cache's: the predictor must compute the pixels the
    model was trained on."""
    import shutil

    from model.data import CACHE_LUNG_DIR
    from model.lung_fields import LUNG_ONNX, LungSegmenter

    folder = Path(lung_model) if lung_model else None
    if config.lung_crop != "none":
        cached = Path(cache_dir) / CACHE_LUNG_DIR
        if not (cached / LUNG_ONNX).is_file():
            raise DataError(f"the model crops to the lungs but its cache {cache_dir} holds no "
                            f"{CACHE_LUNG_DIR}/{LUNG_ONNX}")
        if folder is not None and sha256_file(folder / LUNG_ONNX) != sha256_file(cached / LUNG_ONNX):
            raise DataError(f"--lung-model {folder} is not the segmentation model the cache was cropped with")
        folder = cached
    if folder is None:
        return None, None
    segmenter = LungSegmenter.from_folder(folder)
    shutil.copyfile(folder / LUNG_ONNX, bundle_dir / LUNG_ONNX)
    return segmenter, dict(segmenter.info.to_dict(), onnx=LUNG_ONNX)


def _lung_share_and_external(cache: CachedData, session, config: PreprocessConfig, point: "OperatingPoint",
                             segmenter, settings: EvalSettings) -> tuple[dict, dict | None]:
    """The CAM lung share on the held-out split (val without one) and on the external set, and the external
    set's metrics at val's operating point (nothing is fitted on it)."""
    from model.lung_evaluation import cam_lung_share, split_lung_share

    shares = {}
    split = "holdout" if len(cache.split("holdout")[0]) else "val"
    idx, y = cache.split(split)
    shares[split] = split_lung_share(session, cache.images[idx], y, config, segmenter, settings.n_bootstrap,
                                     settings.seed)
    log.info("CAM lung share (%s, %s): %.3f", split, shares[split]["source"], shares[split]["all"]["mean"])
    external = None
    if settings.external_data:
        from model.external import load_external, score_external

        ext = load_external(settings.external_data, config, segmenter)
        logits, cams = run_images(session, ext.images, config, with_cam=True)
        external = score_external(ext, point.probabilities(logits), point.threshold, settings.n_bootstrap,
                                  settings.seed)
        external["source"] = settings.external_data
        external["abstention"] = abstention_metrics(ext.labels, point.probabilities(logits), *point.band)
        shares["external"] = cam_lung_share(cams, ext.images, ext.labels, segmenter, settings.n_bootstrap,
                                            settings.seed)
        log.info("external n=%d AUC %.4f  sens %.4f  spec %.4f  ECE %.4f; CAM lung share %.3f", external["n"],
                 external["auc"], external["sensitivity"], external["specificity"], external["ece"],
                 shares["external"]["all"]["mean"])
    return shares, external


def _export_checked(net, config: PreprocessConfig, onnx_path: Path, val_images: np.ndarray) -> tuple[Path, dict]:
    """The ONNX graph, refused when it differs from the PyTorch module on real val images."""
    from model.export import export_onnx, parity

    export_onnx(net, config.image_size, onnx_path)
    parity_report = parity(net, onnx_path, val_images[:8], config)
    if parity_report["max_abs_logit_diff"] > parity_report["tolerance"]:
        raise RuntimeError(f"ONNX export differs from PyTorch by {parity_report['max_abs_logit_diff']:.2e}")
    return onnx_path, parity_report


def choose_operating_point(val_logits: np.ndarray, val_y: np.ndarray, settings: EvalSettings) -> OperatingPoint:
    """Calibration, threshold and refer band, all fitted on the val logits."""
    temperature, bias = fit_calibration(val_logits, val_y)
    val_probs = sigmoid(val_logits / temperature + bias)
    threshold = choose_threshold(val_y, val_probs, settings.threshold_method, settings.target_sensitivity)
    log.info("val: temperature %.3f, logit bias %.3f, %s threshold %.4f", temperature, bias,
             settings.threshold_method, threshold)
    band = choose_abstention_band(val_y, val_probs, threshold, settings.refer_target)
    return OperatingPoint(temperature, bias, threshold, band)


@dataclass
class ScoredSplits:
    """What :func:`_score_splits` measures on every split there is."""

    metrics: dict = field(default_factory=dict)  # metrics with CIs
    abstention: dict = field(default_factory=dict)  # the refer band's decided-case figures
    probabilities: dict = field(default_factory=dict)
    risk_coverage: dict = field(default_factory=dict)
    ood: dict = field(default_factory=dict)  # the detector's flagged share and score quantiles


def _score_splits(cache: CachedData, session, config: PreprocessConfig, point: OperatingPoint,
                  val_outputs: tuple[np.ndarray, np.ndarray], settings: EvalSettings,
                  detector: OodDetector | None = None) -> ScoredSplits:
    """Metrics with CIs, refer-band figures, risk-coverage and out-of-distribution shares of every split there is."""
    scored = ScoredSplits(abstention={"target": settings.refer_target, "low": point.band[0], "high": point.band[1]})
    for split in REPORT_SPLITS:
        idx, y = cache.split(split)
        if len(idx) == 0:
            continue
        if split == "val":
            probs, features = val_outputs
        else:
            logits, features = run_images(session, cache.images[idx], config, with_features=True)
            probs = point.probabilities(logits)
        scored.probabilities[split] = probs
        scored.metrics[split] = m = metrics_with_ci(y, probs, point.threshold,
                                                    settings.n_bootstrap if len(idx) >= 20 else 0, settings.seed)
        scored.abstention[split] = abstention_metrics(y, probs, *point.band)
        scored.risk_coverage[split] = risk_coverage(y, probs, point.threshold)
        if detector is not None:
            scored.ood[split] = ood_summary(detector.scores(features))
        log.info("%-8s n=%-5d AUC %.4f  acc %.4f  sens %.4f  spec %.4f  ECE %.4f  refer coverage %.3f%s", split,
                 m["n"], m["auc"], m["accuracy"], m["sensitivity"], m["specificity"], m["ece"],
                 scored.abstention[split]["coverage"],
                 f"  out of distribution {scored.ood[split]['flagged_share']:.3f}" if split in scored.ood else "")
    return scored


def ood_summary(scores: np.ndarray) -> dict:
    """The share of films the detector flags (score above 1) and the score's quantiles."""
    scores = np.asarray(scores, dtype=np.float64)
    quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {"n": int(len(scores)), "flagged": int((scores > 1.0).sum()),
            "flagged_share": float((scores > 1.0).mean()) if len(scores) else float("nan"),
            "score_quantiles": dict(zip([str(q) for q in quantiles],
                                        np.quantile(scores, quantiles).tolist() if len(scores) else [None] * 5))}


def _fit_ood(cache: CachedData, session, config: PreprocessConfig, val_features: np.ndarray,
             settings: EvalSettings) -> tuple[OodDetector, dict]:
    """The detector: statistics from the training split's features (through the exported graph), the
    cut-off from val's. Nothing else is looked at."""
    train_idx, train_y = cache.split("train")
    started = time.perf_counter()
    _, train_features = run_images(session, cache.images[train_idx], config, with_features=True)
    detector, meta = fit_detector(train_features, train_y, val_features, settings.ood_quantile,
                                  settings.ood_flip_share)
    log.info("out-of-distribution detector: %s on %d training films (%d features, Ledoit-Wolf shrinkage %.3f); "
             "cut-off %.3f = the %.3f quantile of %d val films; precision tolerance %.4f (%.1f s)", meta["method"],
             meta["train_films"], meta["dimensions"], meta["shrinkage"], meta["cutoff"], settings.ood_quantile,
             meta["val_films"], meta["score_tolerance"], time.perf_counter() - started)
    return detector, meta


def _intended_use(profile: str, settings: EvalSettings, splits: dict, abstention: dict, split: str) -> dict:
    """What the bundle says the model is for, and the held-out figures it is registered with."""
    m, band = splits[split], abstention[split]
    registered = {"split": split, "n": m["n"], "threshold": m["threshold"],
                  **{k: m[k] for k in ("auc", "sensitivity", "specificity", "ece")},
                  **{f"{k}_ci95": m["ci95"][k] for k in ("auc", "sensitivity", "specificity", "ece") if "ci95" in m},
                  "refer_band": {"low": band["low"], "high": band["high"], "coverage": band["coverage"],
                                 "decided_sensitivity": band["sensitivity"],
                                 "decided_specificity": band["specificity"]}}
    return {"population": settings.population, "source": settings.source, "views": settings.views,
            "age_limit_years": float(settings.age_limit_years), "profile": profile,
            "demonstration": profile in DEMONSTRATION_PROFILES, "registered": registered}


def _int8_export_gate(cache: CachedData, onnx_path: Path, session, val_images: np.ndarray, val_y: np.ndarray,
                      config: PreprocessConfig, settings: EvalSettings) -> dict:
    """Quantise to int8 (calibrated on training images) and keep the graph only if it passes the int8 export
    gate (:func:`model.export.int8_gate`); each server still runs the engine parity gate on it."""
    if not settings.int8:
        return {"accepted": False, "reason": "disabled"}
    from model.export import int8_gate, quantize_int8

    train_idx, _ = cache.split("train")
    rng = np.random.default_rng(settings.seed)
    calib = np.sort(rng.choice(train_idx, min(settings.calibration_images, len(train_idx)), replace=False))
    int8_path = quantize_int8(onnx_path, onnx_path.with_name("model.int8.onnx"), cache.images[calib], config)
    report = int8_gate(session, make_session(int8_path), val_images, val_y, config, settings.int8_max_auc_drop)
    report["calibration_images"] = int(len(calib))
    report["gate"] = "int8 export gate: the int8 graph is kept when its val AUC is at most max_auc_drop below fp32's"
    log.info("int8 export gate (AUC drop on %d val images vs fp32, limit %.4f): AUC %.4f vs %.4f, drop %.4f: %s "
             "(max |logit diff| %.3f; each server's engine parity gate still compares logits and CAMs with fp32)",
             report["n"], settings.int8_max_auc_drop, report["auc_int8"], report["auc_fp32"], report["auc_drop"],
             "int8 graph kept" if report["accepted"] else "int8 graph dropped, the bundle serves fp32",
             report["max_abs_logit_diff"])
    if not report["accepted"]:
        int8_path.unlink()
    return report


def intended_use_metrics(report: dict) -> dict[str, float]:
    """Scalar metrics of the refer band and the out-of-distribution check (KFP and MLflow use these names): per
    split the decided-case sensitivity and specificity, the area under the risk-coverage curve and the share of films
    flagged out of distribution; the detector's cut-off and precision tolerance. Non-finite values are left out."""
    values = {}
    for split, m in report.get("abstention", {}).items():
        if isinstance(m, dict):
            values.update({f"{split}_refer_sensitivity": m["sensitivity"], f"{split}_refer_specificity": m["specificity"]})
    values.update({f"{split}_aurc": curve["aurc"] for split, curve in report.get("risk_coverage", {}).items()})
    values.update({f"{split}_ood_flagged_share": o["flagged_share"] for split, o in report.get("ood", {}).items()})
    ood = (report.get("intended_use") or {}).get("ood")
    if ood:
        values.update(ood_cutoff=ood["cutoff"], ood_score_tolerance=ood["score_tolerance"])
    return {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}


#: Upper bounds of the probability bins: the same as the serving histogram (serving.metrics.PROBABILITY), so
#: that live traffic can be compared with the reference bin for bin.
REFERENCE_BINS = tuple(round(i / 10, 1) for i in range(1, 11))


def reference_distribution(probs: np.ndarray, threshold: float, split: str) -> dict:
    """The prediction mix a version is expected to show: the PNEUMONIA share at its threshold and the counts of
    its calibrated probabilities per bin (``le`` semantics, as Prometheus buckets), on one evaluation split."""
    probs = np.asarray(probs, dtype=float)
    bins = np.searchsorted(np.array(REFERENCE_BINS), probs, side="left").clip(max=len(REFERENCE_BINS) - 1)
    return {"split": split, "n": int(len(probs)), "pneumonia_share": float((probs >= threshold).mean()) if len(probs) else 0.0,
            "bins": list(REFERENCE_BINS), "probability_histogram": np.bincount(bins, minlength=len(REFERENCE_BINS)).tolist()}


def score_bundle_on_images(bundle: Bundle, images: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """Calibrated probabilities of a bundle on uint8 images at ITS resolution."""
    session = make_session(bundle.onnx_path(precision))
    return bundle.probability(run_images(session, images, bundle.preprocess))


def evaluate_folder(bundle: Bundle, data: str, split: str = "test", precision: str = "fp32",
                    n_bootstrap: int = 1000, batch_size: int = 32) -> dict:
    """Score a Kaggle-layout folder's split with the bundle's own preprocessing and threshold."""
    fs, root, images = discover(data)
    chosen = [img for img in images if img.official_split == split]
    if not chosen:
        raise DataError(f"no images in split {split!r} of {data} (expected {split}/{{{','.join(CLASSES)}}}/)")
    config = bundle.preprocess
    session = make_session(bundle.onnx_path(precision))
    logits, labels, skipped = [], [], {}
    batch, batch_labels = [], []

    def flush():
        if batch:
            logits.append(session.run(["logit"], {"image": normalize(np.stack(batch), config)})[0].reshape(-1))
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    for img in chosen:
        with fs.open(f"{root}/{img.key}", "rb") as fh:
            data_bytes = fh.read()
        try:
            batch.append(load_resized(data_bytes, config).pixels)
            batch_labels.append(img.label)
        except InvalidImageError as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    y = np.array(labels)
    probs = bundle.probability(np.concatenate(logits))
    result = metrics_with_ci(y, probs, bundle.threshold, n_bootstrap)
    result.update(split=split, skipped=skipped, model_sha256=bundle.sha256, precision=precision)
    return result
