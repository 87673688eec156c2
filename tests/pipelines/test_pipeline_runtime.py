"""components.runtime: the KFP bookkeeping the steps do besides calling model/ (no pipeline needed)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from kfp.dsl import ClassificationMetrics, Dataset, Metrics

from components.runtime import (champion_val_images, evaluation_metrics, exit_quickly, finite, log_evaluation,
                                registration_params, report_html)
from model.preprocessing import PreprocessConfig


def split_metrics(n: int, auc: float = 0.75) -> dict:
    return {"auc": auc, "accuracy": 0.7, "sensitivity": 0.8, "specificity": 0.6, "f1": 0.7, "brier": 0.2,
            "ece": 0.05, "n": n, "tp": 4, "tn": 3, "fp": 2, "fn": 1, "threshold": 0.4}


@pytest.fixture
def report() -> dict:
    return {"threshold": 0.4, "threshold_method": "youden", "temperature": 1.3, "manifest_sha256": "ab" * 32,
            "splits": {"val": split_metrics(10), "holdout": split_metrics(4, auc=float("nan"))},
            "int8": {"accepted": True, "auc_drop": 0.001},
            "roc_val": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.8, 1.0], "thresholds": [1.0, 0.4, 0.0]},
            "val_predictions": {"index": [2, 0], "label": [1, 0], "probability": [0.9, 0.1]}}


def test_metrics_are_flat_and_finite(report):
    values = evaluation_metrics(report)
    assert values["val_auc"] == 0.75 and values["val_n"] == 10 and values["int8_auc_drop"] == 0.001
    assert "holdout_auc" not in values and values["holdout_sensitivity"] == 0.8  # NaN AUC (one class) dropped
    assert all(math.isfinite(v) for v in values.values())
    assert finite({"a": float("inf"), "b": None, "c": 2}) == {"c": 2.0}


def test_kfp_ui_artifacts(report):
    metrics, classification = Metrics(name="metrics"), ClassificationMetrics(name="classification")
    log_evaluation(report, metrics, classification)
    assert metrics.metadata["val_sensitivity"] == 0.8
    assert len(classification.metadata["confidenceMetrics"]) == 3
    assert classification.metadata["confusionMatrix"]["rows"] == [{"row": [3, 2]}, {"row": [1, 4]}]


def test_html_report_inlines_the_plots(report, tmp_path):
    (tmp_path / "roc.png").write_bytes(b"\x89PNG fake")
    page = report_html(report, tmp_path)
    assert page.count("data:image/png;base64,") == 1 and "<th>holdout</th>" in page and "&ndash;" in page


def test_html_report_names_the_profile_its_figures_the_refer_band_and_the_ood_check(report, tmp_path):
    report = dict(report, abstention={"target": 0.97, "low": 0.2, "high": 0.7,
                                      "holdout": {"n": 4, "coverage": 0.75, "sensitivity": 1.0, "specificity": 0.5}},
                  risk_coverage={"holdout": {"aurc": 0.125}}, ood={"holdout": {"flagged_share": 0.25}},
                  intended_use={"profile": "demo", "demonstration": True, "population": "children aged 1 to 5 years",
                                "source": "Guangzhou", "views": "frontal", "age_limit_years": 18.0,
                                "registered": {"split": "holdout", "n": 4, "auc": 0.9, "auc_ci95": [0.8, 0.95]},
                                "ood": {"cutoff": 61.5, "score_tolerance": 0.01}})
    page = report_html(report, tmp_path)
    assert "Demonstration model" in page and "Profile <strong>demo</strong>" in page
    assert "AUC 0.900 (0.800&ndash;0.950)" in page and "older than 18 years" in page
    row = page[page.index("<th>holdout</th><td>4</td><td>0.7500"):]
    assert row.startswith("<th>holdout</th><td>4</td><td>0.7500</td><td>1.0000</td><td>0.5000</td><td>0.1250</td>"
                          "<td>0.2500</td>")
    assert "distance cut-off 61.500" in page
    values = evaluation_metrics(report)
    assert values["holdout_refer_coverage"] == 0.75 and values["holdout_aurc"] == 0.125
    assert values["holdout_ood_flagged_share"] == 0.25 and values["ood_cutoff"] == 61.5
    plain = report_html(dict(report, intended_use={**report["intended_use"], "demonstration": False}), tmp_path)
    assert "Demonstration model" not in plain


def write_cache(root, images: np.ndarray, size: int) -> None:
    root.mkdir()
    np.save(root / "images.npy", images)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["index", "label", "split"])
        writer.writeheader()
        writer.writerows({"index": i, "label": i % 2, "split": "val"} for i in range(len(images)))
    (root / "summary.json").write_text(json.dumps({
        "preprocess": PreprocessConfig(image_size=size).to_dict(), "source": "s3://b/p", "kept": len(images),
        "fractions": {"val": 0.15, "holdout": 0.1, "seed": 42}}))


def test_champion_images_are_the_reports_val_images_at_the_champions_size(tmp_path):
    images = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in (10, 20, 30)])
    write_cache(tmp_path / "cache", images, 8)
    loader = champion_val_images(tmp_path / "cache", [2, 0])
    same = loader(8)
    assert same.dtype == np.uint8 and same.shape == (2, 8, 8) and same[0, 0, 0] == 30 and same[1, 0, 0] == 10
    bigger = loader(16)
    assert bigger.shape == (2, 16, 16) and bigger[0, 5, 5] == 30


def test_registration_params(tmp_path, report):
    write_cache(tmp_path / "cache", np.zeros((2, 8, 8), np.uint8), 8)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({"profile": "smoke", "epochs": 1, "seed": 42}))
    dataset = Dataset(name="dataset", uri=str(tmp_path / "cache"), metadata={"limit_per_class": 40.0})
    params = registration_params(dataset, tmp_path / "ckpt", report, "run-x")
    assert params == {"profile": "smoke", "epochs": 1, "seed": 42, "data_uri": "s3://b/p", "limit_per_class": 40,
                      "val_fraction": 0.15, "holdout_fraction": 0.1, "split_seed": 42, "images_kept": 2,
                      "threshold_method": "youden", "int8": True, "kfp_run_name": "run-x"}


def test_exit_quickly_freezes_what_survives_a_collection():
    import gc

    try:
        exit_quickly()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on
