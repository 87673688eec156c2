"""An external validation set (``external_nih_224``: adults from another hospital), scored, never learnt from.

VALIDATION ONLY: nothing here fits anything. The calibration, threshold and refer band are the val split's;
this module reads the films through the model's own preprocessing (stage 1 + stage 2, lung crop included),
scores them and reports AUC, sensitivity / specificity at the val-chosen threshold and ECE with bootstrap CIs,
overall and per view (AP / PA: the NIH subset's NORMAL films are mostly AP, its PNEUMONIA films less so, so a
model that learned the projection looks better or worse than it is unless the views are shown apart).

Layout: ``labels.csv`` (columns ``label`` NORMAL/PNEUMONIA, ``file`` relative path, optionally ``view``) beside
the image files.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.data import CLASSES, DataError
from model.errors import InvalidImageError
from model.metrics import auc, metrics_with_ci
from model.preprocessing import PreprocessConfig, load_resized

log = logging.getLogger(__name__)


@dataclass
class ExternalSet:
    images: np.ndarray  # uint8 [N, S, S]: the model's input pixels
    labels: np.ndarray
    views: np.ndarray  # "AP", "PA" or ""
    skipped: dict


def load_external(folder: str | Path, config: PreprocessConfig, segmenter=None) -> ExternalSet:
    """Every film of ``labels.csv`` at the model's input, through :func:`model.preprocessing.load_resized`."""
    root = Path(folder)
    labels_csv = root / "labels.csv"
    if not labels_csv.is_file():
        raise DataError(f"no labels.csv in {root}: not an external validation set (see ../shared/data/README.md)")
    with labels_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    images, labels, views, skipped = [], [], [], {}
    for row in rows:
        if row.get("label") not in CLASSES:
            raise DataError(f"{labels_csv}: label {row.get('label')!r} is neither {' nor '.join(CLASSES)}")
        try:
            image = load_resized((root / row["file"]).read_bytes(), config, segmenter=segmenter)
        except InvalidImageError as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        images.append(image.pixels)
        labels.append(CLASSES.index(row["label"]))
        views.append((row.get("view") or "").strip().upper())
    if not images:
        raise DataError(f"no readable films in {root}")
    return ExternalSet(np.stack(images), np.array(labels), np.array(views), skipped)


def score_external(external: ExternalSet, probabilities: np.ndarray, threshold: float, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Metrics at the val-chosen threshold with CIs, overall and per view, plus how well the probability tells
    the views apart (AUC of AP vs PA: a model that learned the projection scores high there)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    result = metrics_with_ci(external.labels, probs, threshold, n_boot, seed)
    result["skipped"] = external.skipped
    by_view = {}
    for view in sorted(set(external.views.tolist()) - {""}):
        chosen = external.views == view
        by_view[view] = metrics_with_ci(external.labels[chosen], probs[chosen], threshold, n_boot, seed)
    result["by_view"] = by_view
    if {"AP", "PA"} <= set(by_view):
        known = np.isin(external.views, ("AP", "PA"))
        result["view_auc_ap_vs_pa"] = auc(external.views[known] == "AP", probs[known])
    return result
