"""Patient-grouped, stratified k-fold cross-validation (``pneumoscope train --folds K``).

Why: one holdout carved from the training patients flatters (holdout AUC 0.997 vs 0.972 on the official test
split, specificity 0.985 vs 0.71), and the operating point and calibration are what break on new patients.
So every candidate recipe is judged on K folds of the whole training pool (train + val + holdout of the
cache, grouped by patient, stratified by class):

- fold k trains on the other folds, with an inner patient-grouped val carved from them for early stopping;
- its held-out fold gives out-of-fold (OOF) logits for every image of the pool;
- calibration (Platt) and the threshold (Youden) that fold k is scored with are fitted on the OOF logits of
  the OTHER folds (cross-fitting), so no figure is scored with parameters fitted on itself;
- the "refer to a radiologist" band is fitted the same way and reported with its coverage;
- the 16 official val images (``sanity``, the only images here from the acquisition of the official test
  split) are scored every time with the mean logit of the K models and the calibration/threshold fitted on
  all OOF logits: few, but the only same-acquisition check there is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.data import CachedData, DataError
from model.metrics import (abstention_metrics, auc, binary_metrics, choose_abstention_band, choose_threshold,
                           fit_calibration, sigmoid)
from model.profiles import Profile

log = logging.getLogger(__name__)

POOL_SPLITS = ("train", "val", "holdout")
REPORTED = ("auc", "sensitivity", "specificity", "ece", "brier", "accuracy")


def assign_folds(labels: np.ndarray, patients: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of every image; a patient's images share one fold; classes are balanced."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise ValueError(f"--folds needs at least 2 folds, not {k}")
    if min(np.sum(labels == 0), np.sum(labels == 1)) < k:
        raise DataError(f"too few images per class for {k} folds")
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
        folds[held] = fold
    return folds


def inner_val(labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a patient-grouped, stratified val share (early stopping inside one fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    for _, picked in splitter.split(np.zeros(len(labels)), labels, patients):
        if len(set(labels[picked].tolist())) == 2 and len(set(labels.tolist()) - set(np.delete(labels, picked))) == 0:
            mask = np.zeros(len(labels), dtype=bool)
            mask[picked] = True
            return mask
    raise DataError("too few patients per class to carve an inner validation split with both classes from a fold")


def _predict(checkpoint: Path, cache: CachedData, indices: np.ndarray, device: str | None) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader

    from model.preprocessing import PreprocessConfig
    from model.training import CacheDataset, DeviceNormalize, _device_setup, load_checkpoint, predict_logits
    from model.transforms import EvalTransform

    if len(indices) == 0:
        return np.zeros(0, dtype=np.float32)
    net, meta = load_checkpoint(checkpoint)
    config = PreprocessConfig.from_dict(meta["preprocess"])
    dev, amp_dtype = _device_setup(device)
    net = net.to(dev).to(memory_format=torch.channels_last)
    loader = DataLoader(CacheDataset(cache.images, indices, np.zeros(len(indices)), EvalTransform(config)),
                        batch_size=64, shuffle=False, num_workers=0)
    return predict_logits(net, loader, dev, amp_dtype, DeviceNormalize(config, dev))


def _calibrated(logits_fit, labels_fit, logits_apply, threshold_method: str = "youden"):
    temperature, bias = fit_calibration(logits_fit, labels_fit)
    probs_fit = sigmoid(logits_fit / temperature + bias)
    threshold = choose_threshold(labels_fit, probs_fit, threshold_method)
    return sigmoid(logits_apply / temperature + bias), threshold, (temperature, bias), probs_fit


def _summary(per_fold: list[dict]) -> dict:
    out = {}
    for key in REPORTED:
        values = np.array([m[key] for m in per_fold], dtype=np.float64)
        out[key] = {"mean": float(np.nanmean(values)), "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1
                    else 0.0}
    return out


def cross_validate(cache_dir: str | Path, out_dir: str | Path, profile: Profile, k: int = 5, seed: int = 42,
                   device: str | None = None, pretrained: str | None = None, inner_val_fraction: float = 0.15,
                   refer_target: float = 0.97, resume: bool = True) -> dict:
    """Train K fold models and write ``cv.json`` (OOF predictions, per-fold and pooled metrics, sanity set)."""
    from model.training import distributed_context

    out = Path(out_dir)
    ctx = distributed_context()
    cache = CachedData.load(cache_dir)
    pool = _Pool.of(cache, k, seed)
    sanity_idx, sanity_y = cache.split("sanity")
    oof, sanity_logits, fold_runs = _train_folds(cache_dir, cache, out, profile, pool, sanity_idx, seed, device,
                                                 pretrained, inner_val_fraction, resume)
    if not ctx.is_main:
        return {}
    per_fold, abstention, decided_probs = _cross_fitted(pool, oof, refer_target)
    operating_point, band, sanity = _final_operating_point(pool, oof, sanity_y, sanity_logits, refer_target)
    report = {
        "k": k, "seed": seed, "profile": asdict(profile), "n_pool": int(len(pool.index)),
        "n_patients": int(len(set(pool.patients.tolist()))),
        "folds": fold_runs,
        "per_fold": per_fold,
        "mean_sd": _summary(per_fold),
        "pooled_oof_auc_raw": auc(pool.labels, oof),
        "pooled_cross_fitted": binary_metrics(pool.labels, decided_probs, 0.5) | {
            "note": "sensitivity/specificity/accuracy here use 0.5; the per-fold figures use each fold's threshold"},
        "abstention": {"target": refer_target, "per_fold": abstention,
                       "coverage_mean": float(np.mean([a["coverage"] for a in abstention])),
                       "sensitivity_mean": float(np.nanmean([a["sensitivity"] for a in abstention])),
                       "specificity_mean": float(np.nanmean([a["specificity"] for a in abstention])),
                       "band_all_oof": list(band)},
        "operating_point_all_oof": operating_point,
        "sanity": sanity,
        "oof": {"index": pool.index.tolist(), "label": pool.labels.tolist(), "fold": pool.folds.tolist(),
                "logit": np.round(oof, 5).tolist()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(report, indent=2))
    _log_summary(report, k, len(sanity_idx))
    return report


@dataclass(frozen=True)
class _Pool:
    """The images cross-validation draws from (train + val + holdout), their labels, patients and folds."""

    index: np.ndarray  # into the cache
    labels: np.ndarray
    patients: np.ndarray
    folds: np.ndarray  # 0..k-1 per image
    k: int

    @classmethod
    def of(cls, cache: CachedData, k: int, seed: int) -> _Pool:
        rows = [r for r in cache.manifest if r["split"] in POOL_SPLITS]
        labels = np.array([r["label"] for r in rows], dtype=np.int64)
        patients = np.array([r["patient"] for r in rows])
        return cls(np.array([r["index"] for r in rows], dtype=np.int64), labels, patients,
                   assign_folds(labels, patients, k, seed), k)


def _train_folds(cache_dir: str | Path, cache: CachedData, out: Path, profile: Profile, pool: _Pool,
                 sanity_idx: np.ndarray, seed: int, device: str | None, pretrained: str | None,
                 inner_val_fraction: float, resume: bool) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
    """Train one model per fold; returns the out-of-fold logits, each model's sanity logits and the fold runs
    (the last two empty on the other ranks of a torchrun job)."""
    from model.training import distributed_context, train

    ctx = distributed_context()
    k, labels, patients = pool.k, pool.labels, pool.patients
    oof = np.full(len(pool.index), np.nan)
    sanity_logits, fold_runs = [], []
    for fold in range(k):
        rest = np.flatnonzero(pool.folds != fold)
        val_mask = inner_val(labels[rest], patients[rest], inner_val_fraction, seed + fold)
        fit_rows, val_rows, held = rest[~val_mask], rest[val_mask], np.flatnonzero(pool.folds == fold)
        if ctx.is_main:
            log.info("fold %d/%d: train %d, inner val %d, held out %d images (%d patients)", fold + 1, k,
                     len(fit_rows), len(val_rows), len(held), len(set(patients[held].tolist())))
        result = train(cache_dir, out / f"fold{fold + 1}", profile, pretrained=pretrained, seed=seed + fold,
                       resume=resume, device=device,
                       splits={"train": (pool.index[fit_rows], labels[fit_rows]),
                               "val": (pool.index[val_rows], labels[val_rows])})
        if not ctx.is_main:
            continue
        oof[held] = _predict(result.checkpoint, cache, pool.index[held], device)
        sanity_logits.append(_predict(result.checkpoint, cache, sanity_idx, device))
        fold_runs.append({"fold": fold + 1, "best_epoch": result.best_epoch, "inner_val_auc": result.best_val_auc,
                          "images_per_second": result.images_per_second, "seconds": result.seconds,
                          "n_train": int(len(fit_rows)), "n_inner_val": int(len(val_rows)), "n_held": int(len(held)),
                          "oof_auc_raw": auc(labels[held], oof[held])})
    return oof, sanity_logits, fold_runs


def _cross_fitted(pool: _Pool, oof: np.ndarray, refer_target: float) -> tuple[list[dict], list[dict], np.ndarray]:
    """Fold f scored with the operating point the OTHER folds' OOF logits chose: (per-fold metrics, per-fold
    refer-band figures, the decided probability of every pool image)."""
    labels = pool.labels
    per_fold, abstention, decided_probs = [], [], np.zeros(len(pool.index))
    for fold in range(pool.k):
        held, rest = pool.folds == fold, pool.folds != fold
        probs, threshold, _, probs_rest = _calibrated(oof[rest], labels[rest], oof[held])
        decided_probs[held] = probs
        metrics = binary_metrics(labels[held], probs, threshold)
        metrics.update(fold=fold + 1, threshold=threshold)
        per_fold.append(metrics)
        low, high = choose_abstention_band(labels[rest], probs_rest, threshold, refer_target)
        abstention.append(dict(abstention_metrics(labels[held], probs, low, high), fold=fold + 1))
    return per_fold, abstention, decided_probs


def _final_operating_point(pool: _Pool, oof: np.ndarray, sanity_y: np.ndarray, sanity_logits: list[np.ndarray],
                           refer_target: float) -> tuple[dict, tuple[float, float], dict]:
    """The operating point from ALL OOF logits, its refer band, and the sanity set scored through the K models'
    mean logit with it."""
    _, threshold, (temperature, bias), probs_all = _calibrated(oof, pool.labels, oof)
    band = choose_abstention_band(pool.labels, probs_all, threshold, refer_target)
    sanity = {}
    if len(sanity_y):
        sanity_probs = sigmoid(np.mean(sanity_logits, axis=0) / temperature + bias)
        sanity = binary_metrics(sanity_y, sanity_probs, threshold)
        sanity["per_fold_auc"] = [auc(sanity_y, s) for s in sanity_logits]
        sanity["abstention"] = abstention_metrics(sanity_y, sanity_probs, *band)
        sanity["probabilities"] = sanity_probs.round(4).tolist()
        sanity["labels"] = sanity_y.tolist()
    return {"temperature": temperature, "logit_bias": bias, "threshold": threshold}, band, sanity


def _log_summary(report: dict, k: int, n_sanity: int) -> None:
    m, sanity = report["mean_sd"], report["sanity"]
    log.info("%d-fold CV: AUC %.4f ± %.4f, sensitivity %.3f ± %.3f, specificity %.3f ± %.3f, ECE %.3f ± %.3f; "
             "refer band coverage %.3f; sanity (n=%d) AUC %s spec %s", k, m["auc"]["mean"], m["auc"]["sd"],
             m["sensitivity"]["mean"], m["sensitivity"]["sd"], m["specificity"]["mean"], m["specificity"]["sd"],
             m["ece"]["mean"], m["ece"]["sd"], report["abstention"]["coverage_mean"], n_sanity,
             f"{sanity.get('auc', float('nan')):.3f}", f"{sanity.get('specificity', float('nan')):.3f}")
