"""Metrics, calibration and the threshold/champion statistics."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from model.metrics import (auc, binary_metrics, choose_threshold, expected_calibration_error, fit_calibration,
                           fit_temperature,
                           metrics_with_ci, paired_bootstrap_auc, sigmoid)
from numerics import FLOAT64_SAME_FORMULA


def _data(n=600, seed=0, separation=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = rng.normal(0, 1, n) + separation * (2 * labels - 1)
    return labels, logits


def test_auc_matches_sklearn_including_ties():
    labels, logits = _data()
    # pair counting against sklearn's trapezoids: the same rational number, each rounded in float64
    assert abs(auc(labels, logits) - roc_auc_score(labels, logits)) < FLOAT64_SAME_FORMULA
    rounded = np.round(logits)
    assert abs(auc(labels, rounded) - roc_auc_score(labels, rounded)) < FLOAT64_SAME_FORMULA


def test_confusion_based_metrics():
    m = binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]), 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5 and m["accuracy"] == 0.5


def test_temperature_scaling_recovers_the_true_temperature():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < sigmoid(true_logits)).astype(int)
    assert abs(fit_temperature(true_logits * 3.0, labels) - 3.0) < 0.2
    overconfident = sigmoid(true_logits * 3.0)
    calibrated = sigmoid(true_logits * 3.0 / fit_temperature(true_logits * 3.0, labels))
    assert expected_calibration_error(labels, calibrated) < expected_calibration_error(labels, overconfident)


def test_platt_calibration_undoes_a_prior_shift():
    """pos_weight in the loss shifts logits; temperature alone cannot fix that, T + bias does."""
    rng = np.random.default_rng(5)
    true_logits = rng.normal(0.8, 2, 20000)
    labels = (rng.random(20000) < sigmoid(true_logits)).astype(int)
    shifted = (true_logits - 1.2) * 1.5
    temperature, bias = fit_calibration(shifted, labels)
    assert abs(temperature - 1.5) < 0.1 and abs(bias - 1.2) < 0.1
    assert expected_calibration_error(labels, sigmoid(shifted / temperature + bias)) < 0.02
    assert expected_calibration_error(labels, sigmoid(shifted / fit_temperature(shifted, labels))) > 0.03


def test_youden_threshold_separates_separable_data():
    labels = np.array([0] * 50 + [1] * 50)
    probs = np.concatenate([np.linspace(0.05, 0.3, 50), np.linspace(0.6, 0.95, 50)])
    t = choose_threshold(labels, probs, "youden")
    assert 0.3 < t < 0.6
    t_sens = choose_threshold(labels, probs, "sensitivity", 0.9)
    assert binary_metrics(labels, probs, t_sens)["sensitivity"] >= 0.9


def test_bootstrap_ci_contains_the_point_estimate():
    labels, logits = _data()
    m = metrics_with_ci(labels, sigmoid(logits), 0.5, n_boot=200)
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        low, high = m["ci95"][name]
        assert low <= m[name] <= high and high - low < 0.2


def test_paired_bootstrap_prefers_the_better_model_only():
    labels, good = _data(seed=2, separation=1.5)
    noise = np.random.default_rng(3).normal(0, 2.0, len(labels))
    worse = good + noise
    better = paired_bootstrap_auc(labels, sigmoid(good), sigmoid(worse), n_boot=300)
    assert better["delta"] > 0 and better["p_value"] < 0.05
    swapped = paired_bootstrap_auc(labels, sigmoid(worse), sigmoid(good), n_boot=300)
    assert swapped["delta"] == -better["delta"] and swapped["p_value"] > 0.95  # the worse model never wins
    same = paired_bootstrap_auc(labels, sigmoid(good), sigmoid(good), n_boot=300)
    assert same["p_value"] > 0.5


def test_risk_coverage_against_a_hand_computation():
    from model.metrics import abstention_metrics, risk_coverage

    # threshold 0.5: confidence = |logit(p)|. By confidence: 0.99 (y1, right), 0.02 (y0, right), 0.9 (y0, WRONG),
    # 0.2 (y1, WRONG), 0.6 (y1, right). Risk after k films: 0, 0, 1/3, 2/4, 2/5.
    labels = np.array([1, 0, 0, 1, 1])
    probs = np.array([0.99, 0.02, 0.9, 0.2, 0.6])
    curve = risk_coverage(labels, probs, 0.5, points=6)
    assert curve["coverage"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    np.testing.assert_allclose(curve["risk"], [0, 0, 1 / 3, 1 / 2, 2 / 5])
    assert curve["aurc"] == np.mean([0, 0, 1 / 3, 1 / 2, 2 / 5])
    assert curve["risk_at_full_coverage"] == 2 / 5
    # threshold 0.8: confidence in log-odds, not in probability. 0.99 (y0, WRONG) is 0.19 above the threshold and
    # 0.6 (y0, right) 0.2 below it, but in log-odds 0.99 is 3.2 away and 0.6 only 0.98: 0.99 is decided first.
    curve = risk_coverage(np.array([0, 0]), np.array([0.99, 0.6]), 0.8, points=3)
    assert curve["risk"] == [1.0, 0.5]
    # the refer band's own point: decided-case sensitivity, specificity and error rate, by hand
    band = abstention_metrics(labels, probs, 0.3, 0.95)  # decided: 0.99 (y1 right), 0.02 (y0 right), 0.2 (y1 WRONG)
    assert (band["coverage"], band["referred"]) == (0.6, 2)
    assert band["sensitivity"] == 0.5 and band["specificity"] == 1.0 and band["decided_risk"] == 1 / 3
