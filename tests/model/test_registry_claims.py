"""Registry claims on a real SQLite MLflow store: the promotion policies, the paired-bootstrap decision in
both directions, and what the MLflow run holds (metrics with CIs, plots, the evaluation report)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from model.bundle import Bundle
from model.data import CachedData
from model.evaluation import score_bundle_on_images
from model.metrics import paired_bootstrap_auc
from model.registry import CHALLENGER, CHAMPION, log_and_register
from numerics import approx64

pytestmark = pytest.mark.integration

N_BOOT = 300


def _register(tiny_model, uri, report=None, promotion="auto", images=None):
    return log_and_register(tiny_model.bundle, report or tiny_model.report, [{"epoch": 1, "train_loss": 0.7}],
                            {"profile": "smoke"}, tracking_uri=uri, model_name="pneumonia",
                            plots_dir=tiny_model.eval_dir / "plots", promotion=promotion,
                            champion_val_images=images, n_bootstrap=N_BOOT)


def _aliases(client, version: str) -> set[str]:
    return set(client.get_model_version("pneumonia", version).aliases)


def test_promotion_policies_never_auto_always(tiny_model, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    never = _register(tiny_model, uri, promotion="never")
    assert never.version == "1" and never.aliases == [CHALLENGER] and never.promotion == {
        "promote": False, "reason": "promotion disabled"}  # never means never, even without a champion
    first_auto = _register(tiny_model, uri, promotion="auto")
    assert first_auto.promotion == {"promote": True, "reason": "no champion yet"}
    assert _aliases(client, "2") == {CHALLENGER, CHAMPION} and _aliases(client, "1") == set()
    forced = _register(tiny_model, uri, promotion="always")
    assert forced.promotion["promote"] and "forced over version 2" in forced.promotion["reason"]
    assert _aliases(client, "3") == {CHALLENGER, CHAMPION}
    blind = _register(tiny_model, uri, promotion="auto")  # auto without the champion's images: no change
    assert not blind.promotion["promote"] and _aliases(client, "4") == {CHALLENGER}
    assert str(client.get_model_version_by_alias("pneumonia", CHAMPION).version) == "3"
    held = _register(tiny_model, uri, promotion="never")
    assert not held.promotion["promote"] and str(client.get_model_version_by_alias("pneumonia", CHAMPION).version) == "3"
    assert client.get_model_version("pneumonia", "5").tags["promotion"] == "promotion disabled"
    with pytest.raises(ValueError, match="unknown promotion policy"):
        _register(tiny_model, uri, promotion="sometimes")


def test_auto_promotes_exactly_when_the_paired_bootstrap_says_so_both_ways(tiny_model, tmp_path):
    """The champion's scores on the val images are fixed; the labels decide whether it is good or bad, and
    the challenger's val predictions are made better or worse than it. Registration scores the champion with
    the same function on the same images and runs the same float64 bootstrap: its numbers are these, up to
    float64 rounding (numerics.approx64)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert set(_register(tiny_model, uri).aliases) == {CHALLENGER, CHAMPION}
    cache = CachedData.load(tiny_model.cache)
    val_idx, _ = cache.split("val")
    val_images = cache.images[val_idx]
    champion_scores = score_bundle_on_images(Bundle.load(tiny_model.bundle), val_images)
    assert len(np.unique(champion_scores)) == len(champion_scores), "the champion must rank every image"
    rank = np.argsort(np.argsort(champion_scores))
    rng = np.random.default_rng(0)

    def challenger(labels, probs):
        report = copy.deepcopy(tiny_model.report)
        report["val_predictions"] = {"index": val_idx.tolist(), "label": labels.tolist(), "probability": probs.tolist()}
        return report

    # 1) a bad champion (it ranks the positives lowest) against a perfect challenger: promoted
    labels = (rank < len(rank) // 2).astype(int)
    better = labels * 0.8 + rng.uniform(0, 0.1, len(labels))
    expected = paired_bootstrap_auc(labels, better, champion_scores, N_BOOT)
    assert expected["delta"] > 0 and expected["p_value"] < 0.05
    up = _register(tiny_model, uri, challenger(labels, better), images=lambda size: val_images)
    assert up.promotion["promote"] is True and up.promotion["p_value"] == approx64(expected["p_value"])
    assert up.promotion["auc_old"] == approx64(0.0) and up.promotion["champion_version"] == "1"
    assert str(client.get_model_version_by_alias("pneumonia", CHAMPION).version) == "2"

    # 2) swapped: a perfect champion (same graph, labels that follow its ranking) against a coin-flip challenger
    labels = (rank >= len(rank) // 2).astype(int)
    worse = rng.uniform(0, 1, len(labels))
    expected = paired_bootstrap_auc(labels, worse, champion_scores, N_BOOT)
    assert expected["delta"] < 0
    down = _register(tiny_model, uri, challenger(labels, worse), images=lambda size: val_images)
    assert down.promotion["promote"] is False and down.promotion["p_value"] == approx64(expected["p_value"])
    assert down.promotion["auc_old"] == approx64(1.0) and down.promotion["champion_version"] == "2"
    assert str(client.get_model_version_by_alias("pneumonia", CHAMPION).version) == "2"
    assert _aliases(client, "3") == {CHALLENGER}
    assert "does not beat champion v2" in client.get_model_version("pneumonia", "3").tags["promotion"]

    # 3) a little better, but not significantly (0.05 < p < 0.5): no promotion at alpha 0.05
    labels = (rank >= len(rank) // 2).astype(int)
    middle = np.argsort(rank)[len(rank) // 2 - 3:len(rank) // 2 + 3]  # blur the champion near its cut
    labels[middle] = 1 - labels[middle]
    slightly = champion_scores.copy()
    positive = middle[labels[middle] == 1][0]
    slightly[positive] = champion_scores.max() + 1.0  # one positive moved to the top: a few pairs better
    expected = paired_bootstrap_auc(labels, slightly, champion_scores, N_BOOT)
    assert expected["delta"] > 0 and 0.05 < expected["p_value"] < 0.5, expected
    close = _register(tiny_model, uri, challenger(labels, slightly), images=lambda size: val_images)
    assert close.promotion["promote"] is False and close.promotion["p_value"] == approx64(expected["p_value"])

    # 4) equal models: no evidence of improvement, no promotion
    labels = (rank >= len(rank) // 2).astype(int)
    same = _register(tiny_model, uri, challenger(labels, champion_scores), images=lambda size: val_images)
    assert same.promotion["delta"] == 0.0 and not same.promotion["promote"]


def test_metrics_with_cis_and_plots_are_logged_to_the_run(tiny_model, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registration = _register(tiny_model, uri)
    client = MlflowClient(uri, uri)
    run = client.get_run(registration.run_id)
    metrics = run.data.metrics
    report = tiny_model.report
    for split, m in report["splits"].items():  # MLflow keeps metrics as float64: the report's numbers
        for name in ("auc", "accuracy", "sensitivity", "specificity", "f1", "brier", "ece"):
            assert metrics[f"{split}_{name}"] == approx64(m[name]), (split, name)
            if "ci95" in m:
                assert metrics[f"{split}_{name}_ci_low"] == approx64(m["ci95"][name][0])
                assert metrics[f"{split}_{name}_ci_high"] == approx64(m["ci95"][name][1])
            else:
                assert f"{split}_{name}_ci_low" not in metrics
    assert any(m.get("ci95") for m in report["splits"].values())
    assert metrics["threshold"] == approx64(report["threshold"])
    assert metrics["temperature"] == approx64(report["temperature"])
    assert metrics["logit_bias"] == approx64(report["logit_bias"])
    from model.evaluation import intended_use_metrics

    refer_and_ood = intended_use_metrics(report)  # decided-case figures, risk-coverage, OOD shares and cut-off
    assert {"holdout_refer_sensitivity", "holdout_aurc", "holdout_ood_flagged_share", "ood_cutoff"} <= set(refer_and_ood)
    for name, value in refer_and_ood.items():
        assert metrics[name] == pytest.approx(value), name
    plots = {a.path for a in client.list_artifacts(registration.run_id, "plots")}
    assert plots == {"plots/roc.png", "plots/confusion_matrix.png", "plots/calibration.png", "plots/risk_coverage.png"}
    for path in plots:
        local = client.download_artifacts(registration.run_id, path, str(tmp_path))
        assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert {a.path for a in client.list_artifacts(registration.run_id, "evaluation")} == {"evaluation/report.json"}
    assert run.data.tags["pneumoscope.bundle_sha256"] == Bundle.load(tiny_model.bundle).sha256
    assert run.data.params == {"profile": "smoke"}
