"""Evaluation claims: hand-computed metrics, bootstrap CIs against an independent reference and
stratified, calibration and threshold fitted on val only, CIs on every split of 20 images or more."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from model.evaluation import EvalSettings, evaluate_checkpoint
from model.metrics import (auc, binary_metrics, bootstrap_ci, choose_threshold, expected_calibration_error,
                           metrics_with_ci, paired_bootstrap_auc, roc_points, sigmoid)
from numerics import FLOAT64_SAME_FORMULA, U32


# ---------------------------------------------------------------------------------------------------
# point metrics, by hand

def test_f1_brier_ece_and_confusion_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 1, 0])
    probs = np.array([0.95, 0.62, 0.31, 0.42, 0.12, 0.97, 0.94])
    m = binary_metrics(labels, probs, 0.5)
    # predicted positive: 0.95, 0.62, 0.97, 0.94 -> tp 3 (0.95, 0.62, 0.97), fp 1 (0.94); fn 1 (0.31); tn 2
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 2)
    precision, recall = 3 / 4, 3 / 4
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=FLOAT64_SAME_FORMULA)  # 0.75
    assert m["sensitivity"] == pytest.approx(0.75, abs=FLOAT64_SAME_FORMULA)
    assert m["specificity"] == pytest.approx(2 / 3, abs=FLOAT64_SAME_FORMULA)
    assert m["accuracy"] == pytest.approx(5 / 7, abs=FLOAT64_SAME_FORMULA)
    squared = [0.05**2, 0.38**2, 0.69**2, 0.42**2, 0.12**2, 0.03**2, 0.94**2]
    assert m["brier"] == pytest.approx(sum(squared) / 7, abs=FLOAT64_SAME_FORMULA)
    # ECE, 15 equal bins of 1/15: 0.95, 0.97 and 0.94 share bin 14 [0.9333, 1]; the others are alone
    bin14 = 3 / 7 * abs((0.95 + 0.97 + 0.94) / 3 - 2 / 3)
    alone = (abs(0.62 - 1) + abs(0.31 - 1) + abs(0.42 - 0) + abs(0.12 - 0)) / 7
    assert m["ece"] == pytest.approx(bin14 + alone, abs=FLOAT64_SAME_FORMULA)
    assert expected_calibration_error(labels, probs) == pytest.approx(bin14 + alone, abs=FLOAT64_SAME_FORMULA)
    # 3 + 2 + 1 + 3 of the 12 (positive, negative) pairs ordered right
    assert m["auc"] == pytest.approx(9 / 12, abs=FLOAT64_SAME_FORMULA)
    pairs = [(p > n) + 0.5 * (p == n) for p in probs[labels == 1] for n in probs[labels == 0]]
    assert m["auc"] == pytest.approx(np.mean(pairs), abs=FLOAT64_SAME_FORMULA)


def test_f1_without_positives_predicted_and_threshold_edges():
    labels = np.array([1, 0, 1, 0])
    m = binary_metrics(labels, np.array([0.2, 0.1, 0.3, 0.4]), 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 0, 2, 2) and m["f1"] == 0.0 and m["sensitivity"] == 0.0
    at = binary_metrics(labels, np.array([0.5, 0.1, 0.6, 0.49]), 0.5)  # >= threshold is positive
    assert (at["tp"], at["fp"]) == (2, 0) and at["f1"] == 1.0
    one_class = binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]), 0.5)
    assert np.isnan(one_class["specificity"]) and np.isnan(one_class["auc"]) and one_class["sensitivity"] == 0.5


def test_ece_bins_are_fifteen_equal_widths():
    # 0.30 and 0.33 share bin 4 [0.2667, 0.3333); 0.34 starts bin 5: a different binning changes the value
    labels = np.array([0, 1, 1])
    probs = np.array([0.30, 0.33, 0.34])
    expected = 2 / 3 * abs(0.315 - 0.5) + 1 / 3 * abs(0.34 - 1)
    assert expected_calibration_error(labels, probs) == pytest.approx(expected, abs=FLOAT64_SAME_FORMULA)
    assert expected_calibration_error(labels, probs, bins=1) == pytest.approx(abs(probs.mean() - 2 / 3),
                                                                             abs=FLOAT64_SAME_FORMULA)


def test_auc_by_pair_counting_with_ties():
    labels = np.array([1, 1, 0, 0, 1, 0])
    scores = np.array([0.8, 0.4, 0.4, 0.1, 0.9, 0.85])
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[labels == 1] for n in scores[labels == 0]]
    assert auc(labels, scores) == pytest.approx(np.mean(pairs), abs=FLOAT64_SAME_FORMULA)
    assert auc(1 - labels, scores) == pytest.approx(1 - np.mean(pairs), abs=FLOAT64_SAME_FORMULA)


# ---------------------------------------------------------------------------------------------------
# bootstrap

def _scores(n_pos=120, n_neg=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([1] * n_pos + [0] * n_neg)
    probs = sigmoid(rng.normal(0, 1.2, len(labels)) + 1.3 * (2 * labels - 1))
    return labels, probs


def test_bootstrap_ci_width_matches_scipy_reference():
    """Sensitivity and specificity each live in one class, so a stratified bootstrap of them is scipy's
    percentile bootstrap of that class's hit rate: widths must agree."""
    labels, probs = _scores()
    ci = bootstrap_ci(labels, probs, 0.5, n_boot=2000, seed=1)
    for metric, cls, hit in (("sensitivity", 1, probs >= 0.5), ("specificity", 0, probs < 0.5)):
        sample = hit[labels == cls].astype(float)
        ref = stats.bootstrap((sample,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                              random_state=np.random.default_rng(2)).confidence_interval
        # Two Monte Carlo estimates of one percentile interval (2000 and 4000 resamples): each end is a 2.5 %
        # quantile estimate with standard error sqrt(a (1 - a) / B) * sd / phi(z_a) (sd: the hit rate's
        # sampling sd, phi(z_a): the normal density at that quantile); six of those for the difference of the
        # two, plus two steps of the 1/n grid a proportion of n cases lives on.
        n, rate = len(sample), sample.mean()
        sd = np.sqrt(rate * (1 - rate) / n)
        monte_carlo = np.sqrt(0.025 * 0.975 * (1 / 2000 + 1 / 4000)) * sd / stats.norm.pdf(stats.norm.ppf(0.975))
        end = 6 * monte_carlo + 2 / n
        assert abs(ci[metric][0] - ref.low) <= end and abs(ci[metric][1] - ref.high) <= end, (metric, ci, ref)
        assert abs((ci[metric][1] - ci[metric][0]) - (ref.high - ref.low)) <= 2 * end
    point = binary_metrics(labels, probs, 0.5)
    for metric in ("auc", "accuracy", "f1", "brier", "ece"):
        low, high = ci[metric]
        assert low < point[metric] < high and high - low < 0.25, metric


def test_bootstrap_resamples_within_each_class():
    """Positives all right, negatives all wrong: every stratified resample has the same class counts, so
    accuracy and Brier do not vary at all; an unstratified resample would vary them."""
    labels = np.array([1] * 30 + [0] * 20)
    probs = np.where(labels == 1, 0.9, 0.6)
    ci = bootstrap_ci(labels, probs, 0.5, n_boot=300, seed=0)
    assert ci["accuracy"] == [pytest.approx(0.6, abs=FLOAT64_SAME_FORMULA)] * 2
    assert ci["brier"] == [pytest.approx((30 * 0.01 + 20 * 0.36) / 50, abs=FLOAT64_SAME_FORMULA)] * 2
    assert ci["sensitivity"] == [1.0, 1.0] and ci["specificity"] == [0.0, 0.0]


def test_bootstrap_alpha_and_reproducibility():
    labels, probs = _scores(seed=4)
    wide = bootstrap_ci(labels, probs, 0.5, n_boot=600, seed=3, alpha=0.05)
    narrow = bootstrap_ci(labels, probs, 0.5, n_boot=600, seed=3, alpha=0.5)
    assert wide == bootstrap_ci(labels, probs, 0.5, n_boot=600, seed=3)
    for metric in ("auc", "accuracy", "sensitivity"):
        assert wide[metric][0] < narrow[metric][0] < narrow[metric][1] < wide[metric][1], metric


def test_metrics_with_ci_only_when_both_classes_and_resamples():
    labels, probs = _scores(20, 20)
    assert "ci95" in metrics_with_ci(labels, probs, 0.5, n_boot=50)
    assert "ci95" not in metrics_with_ci(labels, probs, 0.5, n_boot=0)
    assert "ci95" not in metrics_with_ci(np.ones(10, int), probs[:10], 0.5, n_boot=50)
    m = metrics_with_ci(labels, probs, 0.37, n_boot=50)
    assert m["threshold"] == 0.37 and m["n"] == 40


# ---------------------------------------------------------------------------------------------------
# threshold, paired bootstrap, ROC points

def test_youden_threshold_is_midway_below_the_best_cut():
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8])
    # J is highest (0.75) cutting at 0.35 (sens 1, spec 0.75) and at 0.6 (sens 0.75, spec 1): the middle
    # of that plateau in index order is 0.6, and the threshold goes halfway down to the next score (0.4)
    assert choose_threshold(labels, probs, "youden") == pytest.approx(0.5, abs=FLOAT64_SAME_FORMULA)
    # the highest cut keeping sensitivity >= 0.95 is 0.35; halfway down to 0.3
    assert choose_threshold(labels, probs, "sensitivity", 0.95) == pytest.approx(0.325, abs=FLOAT64_SAME_FORMULA)
    assert choose_threshold(labels, probs, "sensitivity", 0.7) == pytest.approx(0.5, abs=FLOAT64_SAME_FORMULA)
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(labels, probs, "f1")


def test_threshold_at_the_lowest_score_and_unreachable_target():
    labels = np.array([1, 1, 0])
    probs = np.array([0.2, 0.9, 0.5])
    lowest = pytest.approx(0.2, abs=FLOAT64_SAME_FORMULA)
    assert choose_threshold(labels, probs, "sensitivity", 1.0) == lowest  # nothing below it
    assert choose_threshold(labels, probs, "sensitivity", 1.01) == lowest  # falls back to the lowest


def test_paired_bootstrap_swapped_models_flip_the_verdict():
    rng = np.random.default_rng(3)
    labels = np.array([1] * 60 + [0] * 60)
    good = sigmoid(rng.normal(0, 1, 120) + 1.5 * (2 * labels - 1))
    worse = sigmoid(np.log(good / (1 - good)) + rng.normal(0, 2.5, 120))
    forward = paired_bootstrap_auc(labels, good, worse, n_boot=400, seed=0)
    backward = paired_bootstrap_auc(labels, worse, good, n_boot=400, seed=0)
    assert forward["delta"] > 0 and forward["p_value"] < 0.05
    # the same seed draws the same resamples: every delta is negated exactly, and the percentiles of the
    # negated deltas are the negated percentiles up to float64 rounding of the interpolation
    assert backward["delta"] == pytest.approx(-forward["delta"], abs=FLOAT64_SAME_FORMULA)
    assert backward["p_value"] > 0.95
    assert forward["auc_new"] == pytest.approx(auc(labels, good), abs=FLOAT64_SAME_FORMULA)
    assert forward["auc_old"] == pytest.approx(auc(labels, worse), abs=FLOAT64_SAME_FORMULA)
    low, high = forward["delta_ci95"]
    assert 0 < low < forward["delta"] < high
    assert backward["delta_ci95"] == pytest.approx([-high, -low], abs=FLOAT64_SAME_FORMULA)
    same = paired_bootstrap_auc(labels, good, good, n_boot=100)
    assert same["p_value"] == pytest.approx(1.0, abs=FLOAT64_SAME_FORMULA) and same["delta"] == 0.0
    assert same["n"] == 120
    # no resamples (--n-bootstrap 0): the point estimates, no interval, and no evidence to promote on
    unsampled = paired_bootstrap_auc(labels, good, worse, n_boot=0)
    assert unsampled["delta"] == forward["delta"] and unsampled["delta_ci95"] is None
    assert unsampled["p_value"] == 1.0


def test_roc_points_are_a_thinned_monotone_curve():
    labels, probs = _scores(300, 200)
    points = roc_points(labels, probs, max_points=50)
    assert 2 <= len(points["fpr"]) <= 50 and len(points["fpr"]) == len(points["tpr"]) == len(points["thresholds"])
    assert points["fpr"][0] == 0.0 and points["tpr"][-1] == 1.0 and points["fpr"][-1] == 1.0
    assert np.all(np.diff(points["fpr"]) >= 0) and np.all(np.diff(points["tpr"]) >= 0)
    assert all(0.0 <= t <= 1.0 for t in points["thresholds"])
    assert len(roc_points(labels, probs)["fpr"]) > 50


# ---------------------------------------------------------------------------------------------------
# evaluate_checkpoint: what depends on val only, and which splits get CIs

def _relabel(cache_src, cache_dst, splits):
    shutil.copytree(cache_src, cache_dst)
    with (cache_src / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row["split"] in splits:
            row["label"] = str(1 - int(row["label"]))
    with (cache_dst / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.integration
def test_threshold_and_calibration_depend_on_val_only(tiny_model, tmp_path):
    base = tiny_model.report
    _relabel(tiny_model.cache, tmp_path / "relabelled", {"test", "holdout", "sanity", "train"})
    other = evaluate_checkpoint(tiny_model.checkpoint, tmp_path / "relabelled", tmp_path / "eval",
                                EvalSettings(n_bootstrap=0, int8=False))
    for key in ("threshold", "temperature", "logit_bias"):
        assert other[key] == base[key], key
    # the out-of-distribution statistics and cut-off see train's films (not which class is which) and val's
    assert other["intended_use"]["ood"]["cutoff"] == pytest.approx(base["intended_use"]["ood"]["cutoff"], rel=1e-9)
    assert other["splits"]["val"]["auc"] == base["splits"]["val"]["auc"]
    for split in ("test", "holdout"):  # the relabelling did change what those splits measure
        flipped = 1 - base["splits"][split]["auc"]
        assert other["splits"][split]["auc"] == pytest.approx(flipped, abs=FLOAT64_SAME_FORMULA)
    _relabel(tiny_model.cache, tmp_path / "val_relabelled", {"val"})
    moved = evaluate_checkpoint(tiny_model.checkpoint, tmp_path / "val_relabelled", tmp_path / "eval_val",
                                EvalSettings(n_bootstrap=0, int8=False))
    assert (moved["temperature"], moved["logit_bias"]) != (base["temperature"], base["logit_bias"])


@pytest.mark.integration
def test_every_split_of_20_or_more_gets_cis(tiny_model):
    splits = tiny_model.report["splits"]
    assert {"val", "holdout", "test", "sanity"} <= set(splits)
    for name, m in splits.items():
        if m["n"] >= 20:
            assert set(m["ci95"]) == {"auc", "accuracy", "sensitivity", "specificity", "f1", "brier", "ece"}, name
            for metric, (low, high) in m["ci95"].items():
                assert low <= high, (name, metric)
        else:
            assert "ci95" not in m, f"{name} has {m['n']} images: too few for a bootstrap CI"
    assert splits["sanity"]["n"] < 20 <= min(splits[s]["n"] for s in ("val", "holdout", "test"))


@pytest.mark.integration
def test_report_probabilities_are_the_calibrated_onnx_outputs(tiny_model):
    from model.bundle import Bundle, make_session, run_images
    from model.data import CachedData

    report, bundle = tiny_model.report, Bundle.load(tiny_model.bundle)
    cache = CachedData.load(tiny_model.cache)
    idx, labels = cache.split("val")
    logits = run_images(make_session(bundle.onnx_path("fp32")), cache.images[idx], cache.config)
    expected = sigmoid(logits / report["temperature"] + report["logit_bias"])
    # the same session settings and batches on the same images in this process: identical logits, and the
    # same float64 calibration
    assert report["val_predictions"]["probability"] == expected.tolist()
    assert report["val_predictions"]["label"] == labels.tolist()
    assert bundle.threshold == report["threshold"] and bundle.temperature == report["temperature"]
    # the serving calibration works in float64, evaluation's sigmoid on float32 logits in float32: z = l / T + b
    # rounds twice (2u on its terms), the sigmoid's slope is at most 1/4, and its own float32 result a few u
    z_rounding = 2 * U32 * (np.abs(logits / report["temperature"]) + abs(report["logit_bias"]))
    assert (np.abs(bundle.probability(logits) - expected) <= z_rounding / 4 + 4 * U32).all()
    point = binary_metrics(labels, expected, report["threshold"])
    for metric in ("auc", "accuracy", "sensitivity", "specificity", "f1", "brier", "ece"):
        assert report["splits"]["val"][metric] == pytest.approx(point[metric], abs=FLOAT64_SAME_FORMULA), metric


@pytest.mark.integration
def test_the_bundle_says_what_the_model_is_for_and_the_report_adds_refer_and_ood_figures(tiny_model):
    from model.bundle import Bundle, make_session, run_images
    from model.data import CachedData
    from model.evaluation import intended_use_metrics
    from model.ood import OodDetector

    report, bundle = tiny_model.report, Bundle.load(tiny_model.bundle)
    use = bundle.intended_use
    assert use == report["intended_use"]
    assert (use["profile"], use["demonstration"], use["age_limit_years"]) == ("smoke", True, 18.0)
    assert "children" in use["population"] and "frontal" in use["views"]
    # registered with the holdout figures and their CIs, and the refer band's decided-case figures there
    holdout, band, registered = report["splits"]["holdout"], report["abstention"]["holdout"], use["registered"]
    assert registered["split"] == "holdout" and registered["n"] == holdout["n"]
    for name in ("auc", "sensitivity", "specificity", "ece"):
        assert registered[name] == holdout[name] and registered[f"{name}_ci95"] == holdout["ci95"][name]
    assert registered["refer_band"] == {"low": band["low"], "high": band["high"], "coverage": band["coverage"],
                                        "decided_sensitivity": band["sensitivity"],
                                        "decided_specificity": band["specificity"]}
    # the share flagged per split is the bundle's detector on that split's features through the bundle's graph
    detector, cache = OodDetector.load(bundle), CachedData.load(tiny_model.cache)
    session = make_session(bundle.onnx_path("fp32"))
    for split in ("val", "holdout", "sanity"):
        idx, _ = cache.split(split)
        _, features = run_images(session, cache.images[idx], bundle.preprocess, with_features=True)
        assert report["ood"][split]["flagged_share"] == np.mean(detector.scores(features) > 1), split
    assert report["ood"]["val"]["flagged_share"] <= 1 - use["ood"]["quantile"] + 1 / report["splits"]["val"]["n"]
    # the risk-coverage curve by hand: decide the films most confident in log-odds from the threshold first
    probs = np.array(report["val_predictions"]["probability"])
    labels = np.array(report["val_predictions"]["label"])
    t = report["threshold"]
    confidence = np.abs(np.log(probs / (1 - probs)) - np.log(t / (1 - t)))
    wrong = ((probs >= t).astype(int) != labels)[np.argsort(-confidence, kind="stable")]
    risk = np.cumsum(wrong) / np.arange(1, len(wrong) + 1)
    curve = report["risk_coverage"]["val"]
    assert curve["aurc"] == pytest.approx(risk.mean()) and curve["risk_at_full_coverage"] == pytest.approx(risk[-1])
    for coverage, value in zip(curve["coverage"], curve["risk"]):
        assert value == pytest.approx(risk[round(coverage * len(risk)) - 1])
    assert risk[-1] == pytest.approx(1 - report["splits"]["val"]["accuracy"])
    assert Path(report["plots"]["risk_coverage"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = intended_use_metrics(report)  # what MLflow and KFP get
    assert metrics["ood_cutoff"] == use["ood"]["cutoff"] and metrics["val_aurc"] == curve["aurc"]
    assert metrics["holdout_refer_specificity"] == band["specificity"]
