"""What the steps do inside the pipeline image besides calling ``model/``: KFP bookkeeping.

Imported at run time from the components' bodies (the project is installed in the image). Artifacts
are duck-typed (``.path``, ``.metadata``, ``log_metric``...), so nothing here imports kfp and the
functions can be tested without a pipeline.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict
from pathlib import Path

from model.data import CLASSES
from model.evaluation import intended_use_metrics
from model.lung_evaluation import report_metrics
from model.metrics import METRIC_NAMES

REPORT_SPLITS = ("val", "holdout", "sanity")
PLOTS = (("roc.png", "ROC curve"), ("confusion_matrix.png", "Confusion matrix"), ("calibration.png", "Calibration"),
         ("risk_coverage.png", "Risk-coverage (refer band marked)"))


def finite(values: dict) -> dict[str, float]:
    """Only real numbers: KFP metrics and MLflow have no NaN (a split with one class has no AUC)."""
    out = {}
    for key, value in values.items():
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def exit_quickly() -> None:
    """Let the step's process end in a fraction of a second instead of ~2 s.

    KFP runs every step in a process of its own, and at exit CPython's final garbage collection walks
    every object torch, onnx and mlflow created (1.5-2 s per step on 2 cores). Collect the real garbage
    now, so that finalizers run as usual, then freeze the survivors: the shutdown collection skips
    them. Call it last in a step; objects created afterwards are collected normally.
    """
    import gc

    gc.collect()
    gc.freeze()


def lung_folder(lung_model) -> str | None:
    """The lung_segmentation step's folder, or None when the step trained nothing (no lung_masks_uri)."""
    folder = Path(lung_model.path)
    return str(folder) if (folder / "lung.onnx").is_file() else None


def local_copy(uri: str, tmp: str) -> str:
    """A local path for ``uri``: itself when local (or a PVC mount), else a copy fetched with fsspec (s3://...)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return root
    target = Path(tmp) / "copy"
    fs.get(root.rstrip("/") + "/", str(target), recursive=True)
    return str(target)


def write_train_params(out_dir: str | Path, profile, seed: int, num_gpus: int = 1) -> Path:
    """``params.json`` beside the checkpoint: the resolved training settings, for the registry."""
    params = {k: v for k, v in asdict(profile).items() if k not in ("name", "description")}
    params.update(profile=profile.name, seed=seed, num_gpus=num_gpus)
    path = Path(out_dir) / "params.json"
    path.write_text(json.dumps(params, indent=2, sort_keys=True))
    return path


def evaluation_metrics(report: dict) -> dict[str, float]:
    """Flat scalar metrics of an evaluation report: ``val_auc``, ``holdout_sensitivity``, ..."""
    values: dict = {}
    for split in ("val", "holdout"):
        m = report["splits"].get(split)
        if m:
            values.update({f"{split}_{k}": m[k] for k in METRIC_NAMES})
            values[f"{split}_n"] = m["n"]
    values.update(threshold=report["threshold"], temperature=report["temperature"],
                  logit_bias=report.get("logit_bias", 0.0))
    for split, m in report.get("abstention", {}).items():  # the refer band fitted on val, its coverage
        if isinstance(m, dict):
            values[f"{split}_refer_coverage"] = m["coverage"]
    values.update(intended_use_metrics(report))  # the same names as in MLflow
    if report["int8"].get("auc_drop") is not None:
        values["int8_auc_drop"] = report["int8"]["auc_drop"]
    values.update(report_metrics(report))
    return finite(values)


def lung_share_html(report: dict) -> list[str]:
    """The report's section on where the evidence falls (and the external set, when one was scored)."""
    out = []
    shares = report.get("cam_lung_share") or {}
    if shares:
        out.append("<h3>Where the evidence falls: CAM mass inside the lungs</h3><table><tr><th>split</th><th>mask"
                   "</th><th>n</th><th>all (95% CI)</th><th>NORMAL</th><th>PNEUMONIA</th><th>lungs' share of the "
                   "film</th></tr>")
        for split, share in shares.items():
            a = share["all"]
            ci = f" ({a['ci95'][0]:.3f}-{a['ci95'][1]:.3f})" if a.get("ci95") else ""
            out.append(f"<tr><th>{html.escape(split)}</th><td>{html.escape(share['source'])}</td><td>{a['n']}</td>"
                       f"<td>{a['mean']:.3f}{ci}</td><td>{share['NORMAL'].get('mean', float('nan')):.3f}</td>"
                       f"<td>{share['PNEUMONIA'].get('mean', float('nan')):.3f}</td>"
                       f"<td>{share['mask_area']:.3f}</td></tr>")
        out.append("</table><p>A share near or below the lungs' own share of the film means the heatmap does not "
                   "follow the lungs: evidence on the heart, the diaphragm, the abdomen or a marker.</p>")
    external = report.get("external")
    if external:
        cells = "".join(f"<td>{external[k]:.4f}</td>" for k in METRIC_NAMES)
        out.append(f"<h3>External validation (never fitted on): {html.escape(str(external.get('source', '')))}</h3>"
                   "<table><tr><th>view</th><th>n</th>" + "".join(f"<th>{k}</th>" for k in METRIC_NAMES) + "</tr>"
                   f"<tr><th>all</th><td>{external['n']}</td>{cells}</tr>")
        for view, m in external.get("by_view", {}).items():
            cells = "".join(f"<td>{m[k]:.4f}</td>" for k in METRIC_NAMES)
            out.append(f"<tr><th>{html.escape(view)}</th><td>{m['n']}</td>{cells}</tr>")
        out.append("</table>")
    return out


def log_evaluation(report: dict, metrics, classification) -> None:
    """Scalars into ``Metrics``; the val ROC curve and confusion matrix into ``ClassificationMetrics``."""
    for name, value in evaluation_metrics(report).items():
        metrics.log_metric(name, value)
    roc = report["roc_val"]
    classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    val = report["splits"]["val"]
    classification.log_confusion_matrix(list(CLASSES), [[val["tn"], val["fp"]], [val["fn"], val["tp"]]])


def report_html(report: dict, plots_dir: str | Path) -> str:
    """A self-contained page (plots inlined) for the KFP UI's HTML viewer."""
    def cell(value) -> str:
        return "&ndash;" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
            (f"{value:.4f}" if isinstance(value, float) else html.escape(str(value)))

    rows = []
    for split in REPORT_SPLITS:
        m = report["splits"].get(split)
        if m:
            cells = "".join(f"<td>{cell(m[k])}</td>" for k in METRIC_NAMES)
            rows.append(f"<tr><th>{split}</th><td>{m['n']}</td>{cells}</tr>")
    images = []
    for name, title in PLOTS:
        path = Path(plots_dir) / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            images.append(f'<figure><img alt="{title}" src="data:image/png;base64,{data}"><figcaption>{title}'
                          "</figcaption></figure>")
    int8 = report["int8"]
    int8_line = ("int8 export gate: " + ("int8 graph kept" if int8.get("accepted") else "no int8 graph") +
                 (f" (val AUC drop {int8['auc_drop']:.4f})" if int8.get("auc_drop") is not None else ""))
    return "\n".join([
        "<!doctype html><html><head><meta charset='utf-8'><title>pneumoscope evaluation</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}figure{display:inline-block;margin:8px}"
        ".banner{background:#fff3cd;border:1px solid #c9a227;padding:6px 10px}</style></head><body>",
        *_intended_use_html(report.get("intended_use") or {}),
        "<h2>Evaluation (threshold and temperature chosen on val)</h2>",
        f"<p>threshold {report['threshold']:.4f} ({html.escape(report['threshold_method'])}), temperature "
        f"{report['temperature']:.3f}; {html.escape(int8_line)}; manifest {report['manifest_sha256'][:12]}</p>",
        "<table><tr><th>split</th><th>n</th>" + "".join(f"<th>{k}</th>" for k in METRIC_NAMES) + "</tr>",
        *rows, "</table>", *_refer_html(report, cell), *lung_share_html(report), *images, "</body></html>"])


def _intended_use_html(use: dict) -> list[str]:
    """The model's profile, what it is for, and the held-out figures it is registered with."""
    if not use:
        return []
    out = []
    if use.get("demonstration"):
        out.append(f"<p class='banner' role='note'><strong>Demonstration model</strong> (profile "
                   f"{html.escape(str(use.get('profile')))}): it shows the machinery, it is not a clinical model.</p>")
    registered = use.get("registered") or {}

    def figure(name: str) -> str:
        value, ci = registered.get(name), registered.get(f"{name}_ci95")
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "&ndash;"
        return f"{value:.3f}" + (f" ({ci[0]:.3f}&ndash;{ci[1]:.3f})" if ci else "")

    band = registered.get("refer_band") or {}
    out += ["<h2>Intended use</h2>",
            f"<p>Profile <strong>{html.escape(str(use.get('profile')))}</strong>. Trained on "
            f"{html.escape(str(use.get('population')))}: {html.escape(str(use.get('source')))}; "
            f"{html.escape(str(use.get('views')))}. Patients older than {use.get('age_limit_years', 18):g} years "
            "are referred.</p>",
            f"<p>Registered with the {html.escape(str(registered.get('split')))} figures (n={registered.get('n')}, "
            f"95 % CI): AUC {figure('auc')}, sensitivity {figure('sensitivity')}, specificity "
            f"{figure('specificity')}, ECE {figure('ece')}."
            + (f" Refer band {band['low']:.3f}&ndash;{band['high']:.3f}: coverage {band['coverage']:.3f}, decided "
               f"sensitivity {band['decided_sensitivity']:.3f}, specificity {band['decided_specificity']:.3f}."
               if band and all(isinstance(band.get(k), float) and math.isfinite(band[k]) for k in
                               ("coverage", "decided_sensitivity", "decided_specificity")) else "") + "</p>"]
    return out


def _refer_html(report: dict, cell) -> list[str]:
    """Per split: the refer band's decided-case figures, the risk-coverage area and the out-of-distribution share."""
    abstention, curves, ood = report.get("abstention", {}), report.get("risk_coverage", {}), report.get("ood", {})
    cutoff = ((report.get("intended_use") or {}).get("ood") or {}).get("cutoff")
    rows = []
    for split in REPORT_SPLITS:
        band = abstention.get(split)
        if not isinstance(band, dict):
            continue
        flagged = ood.get(split, {}).get("flagged_share")
        rows.append(f"<tr><th>{split}</th><td>{band['n']}</td><td>{cell(band['coverage'])}</td>"
                    f"<td>{cell(band['sensitivity'])}</td><td>{cell(band['specificity'])}</td>"
                    f"<td>{cell(curves.get(split, {}).get('aurc'))}</td><td>{cell(flagged)}</td></tr>")
    if not rows:
        return []
    return [f"<h2>Refer band {abstention['low']:.4f}&ndash;{abstention['high']:.4f} and out-of-distribution check</h2>",
            "<p>Decided-case sensitivity and specificity: over the films the band does not refer. AURC: the area under "
            "the risk-coverage curve (lower is better). Flagged: films whose out-of-distribution score exceeds 1"
            + (f" (distance cut-off {cutoff:.3f}, fitted on val)" if cutoff is not None else "") + ".</p>",
            "<table><tr><th>split</th><th>n</th><th>coverage</th><th>decided sensitivity</th>"
            "<th>decided specificity</th><th>AURC</th><th>flagged out of distribution</th></tr>",
            *rows, "</table>"]


def champion_val_images(cache_dir: str | Path, index: list[int]):
    """``champion_val_images`` for ``log_and_register``: the SAME val images the report scored, in its
    order, at whatever resolution the champion was trained."""
    import numpy as np

    from model.data import CachedData
    from model.preprocessing import PreprocessConfig, resize

    def images(size: int):
        cache = CachedData.load(cache_dir)
        pixels = np.asarray(cache.images[np.asarray(index, dtype=np.int64)])
        if size == cache.config.image_size:
            return pixels
        config = PreprocessConfig(image_size=size)
        return np.stack([resize(px, config) for px in pixels])

    return images


def registration_params(dataset, checkpoint_dir: str | Path, report: dict, pipeline_run_name: str = "") -> dict:
    """MLflow params of one pipeline run: data, resolved training settings, evaluation settings."""
    summary = json.loads((Path(dataset.path) / "summary.json").read_text())
    params = json.loads((Path(checkpoint_dir) / "params.json").read_text())
    params.update({
        "data_uri": summary["source"],
        "limit_per_class": int(dataset.metadata.get("limit_per_class") or 0),
        "val_fraction": summary["fractions"]["val"],
        "holdout_fraction": summary["fractions"]["holdout"],
        "split_seed": summary["fractions"]["seed"],
        "images_kept": summary["kept"],
        **{f"quality_{k}": v for k, v in summary.get("quality", {}).items() if k != "thumbnails"},
        "threshold_method": report["threshold_method"],
        "int8": bool(report["int8"].get("accepted")),
        "kfp_run_name": pipeline_run_name or None,
    })
    return params


def keep_unregistered(exc: BaseException, evaluation: Path, report: dict, history: list, params: dict,
                      cache_dir: str | Path, val_images, *, tracking_uri: str, model_name: str, promotion: str,
                      n_bootstrap: int, pipeline_run_id: str) -> None:
    """The register step failed: when MLflow (or its artifact store) was away and the step runs on this machine
    (kfp.local), keep the model, its metrics and report under PNEUMOSCOPE_HOME/registrations/RUN and say how to
    finish; in a KFP pod the pipeline's retry policy retries the step from the pipeline's artifacts instead (the
    registration is idempotent per pipeline run)."""
    import logging
    import os
    import sys

    from model.data import CachedData
    from model.kept_registration import keep, registry_unavailable, safe_run_id
    from model.settings import Settings

    if not registry_unavailable(exc) or os.environ.get("KFP_POD_NAME"):
        return
    run = safe_run_id(pipeline_run_id)
    folder = keep(Settings().home.resolve(), run, evaluation / "bundle", report, history, params,
                  tracking_uri=tracking_uri, model_name=model_name, promotion=promotion, n_bootstrap=n_bootstrap,
                  error=(str(exc).strip().splitlines() or [type(exc).__name__])[0][:300],
                  plots_dir=evaluation / "plots", data_quality_dir=Path(cache_dir) / "quality",
                  champion_val_images=val_images, image_size=CachedData.load(cache_dir).config.image_size)
    message = (f"MLflow at {tracking_uri} did not take the registration ({type(exc).__name__}); the model, its "
               f"metrics and report are kept in {folder}: finish with `pneumoscope register --retry {run}`")
    logging.getLogger("pneumoscope").error(message)
    print(f"KEPT {json.dumps({'run': run, 'folder': str(folder)})}", file=sys.stderr)
