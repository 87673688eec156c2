"""Where a model's evidence falls: the share of its CAM mass inside the lung fields, per split, with a CI.

For each image at the model's input (the cached, possibly lung-cropped, S x S pixels): the positive CAM of
the exported graph, upsampled to the lung mask, inside the mask / total (:func:`model.lung_fields.lung_share`).
The mask comes from the lung segmentation model when there is one (run on the same input pixels), else from
the project's fixed elliptical lung-field prior (``model.preprocessing.field_mask``), and the report says which.
A model whose evidence sits on the heart, the diaphragm or a corner marker shows a low share before it is
promoted (issue 16).
"""

from __future__ import annotations

import numpy as np

from model.bundle import run_images
from model.lung_fields import SEGMENTATION_SIZE, LungSegmenter, lung_shares
from model.preprocessing import PreprocessConfig
from model.quality import lung_fields

SOURCE_SEGMENTATION, SOURCE_ELLIPSE = "segmentation", "ellipse_prior"


def input_masks(images: np.ndarray, segmenter: LungSegmenter | None) -> tuple[np.ndarray, str]:
    """bool [N, s, s] lung masks of model-input images and where they come from."""
    if segmenter is None:  # the lung-field prior the web app measures with too: two ellipses, no mediastinum
        return lung_fields(SEGMENTATION_SIZE, SEGMENTATION_SIZE)[None].repeat(len(images), 0), SOURCE_ELLIPSE
    return np.stack([segmenter.mask(np.asarray(im)) for im in images]), SOURCE_SEGMENTATION


def mean_with_ci(values: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean, median and a 95 % percentile bootstrap CI of the mean over images (NaNs left out and counted)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    out = {"n": int(len(finite)), "n_no_positive_cam": int(len(values) - len(finite))}
    if not len(finite):
        return out | {"mean": float("nan"), "median": float("nan"), "ci95": [float("nan"), float("nan")]}
    out.update(mean=float(finite.mean()), median=float(np.median(finite)))
    if n_boot and len(finite) > 1:
        rng = np.random.default_rng(seed)
        means = finite[rng.integers(0, len(finite), size=(n_boot, len(finite)))].mean(axis=1)
        out["ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def cam_lung_share(cams: np.ndarray, images: np.ndarray, labels: np.ndarray, segmenter: LungSegmenter | None,
                   n_boot: int = 1000, seed: int = 0) -> dict:
    """The CAM lung share of every image (model-input frame: ``images`` are the pixels the model saw, ``cams``
    its CAMs of them), summarised overall and per class."""
    masks, source = input_masks(images, segmenter)
    shares = lung_shares(cams, masks)
    labels = np.asarray(labels)
    summary = {"source": source, "all": mean_with_ci(shares, n_boot, seed), "mask_area": float(np.mean(masks)),
               "per_image": [None if not np.isfinite(v) else round(float(v), 4) for v in shares]}
    for label, name in ((0, "NORMAL"), (1, "PNEUMONIA")):
        summary[name] = mean_with_ci(shares[labels == label], n_boot, seed)
    return summary


def split_lung_share(session, images: np.ndarray, labels: np.ndarray, config: PreprocessConfig,
                     segmenter: LungSegmenter | None, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`cam_lung_share` of cached model-input images, CAMs computed here by the exported graph."""
    _, cams = run_images(session, images, config, with_cam=True)
    return cam_lung_share(cams, images, labels, segmenter, n_boot, seed)


def report_metrics(report: dict) -> dict[str, float]:
    """Flat metrics of an evaluation report's lung-share and external sections, finite ones only (MLflow, KFP):
    ``<split>_cam_lung_share`` (+ ``_ci_low`` / ``_ci_high``) and ``external_auc``, ``external_specificity``, ...
    (+ CIs, ``external_view_auc_ap_vs_pa``): a model whose evidence sits under the diaphragm, or that fails on
    another hospital's films, shows it before it is promoted."""
    import math

    from model.metrics import METRIC_NAMES

    values: dict = {}
    for split, share in (report.get("cam_lung_share") or {}).items():
        values[f"{split}_cam_lung_share"] = share["all"].get("mean")
        if share["all"].get("ci95"):
            values[f"{split}_cam_lung_share_ci_low"], values[f"{split}_cam_lung_share_ci_high"] = share["all"]["ci95"]
    external = report.get("external") or {}
    if external:
        values.update({f"external_{k}": external.get(k) for k in METRIC_NAMES})
        for k, (low, high) in external.get("ci95", {}).items():
            values[f"external_{k}_ci_low"], values[f"external_{k}_ci_high"] = low, high
        values["external_view_auc_ap_vs_pa"] = external.get("view_auc_ap_vs_pa")
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
