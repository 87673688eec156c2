"""The analysis' statistics and verdict on known numbers, and what evaluation stores for it: the reference
distribution (in the bundle and as a registry tag) and the evaluation gate tag."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rollout.analysis import BINS, Side, goodness_of_fit_p, homogeneity_p, judge
from rollout.settings import RolloutSettings


def side(version, requests=1000, errors=0, p99=0.5, rejections=0, share=0.4, hist=None, seed=0):
    rng = np.random.default_rng(seed)
    hist = np.bincount(np.searchsorted(BINS, rng.beta(2, 3, 2000)), minlength=10)[:10] if hist is None else hist
    return Side(version, requests=requests, errors=errors, p99=p99, rejections=rejections, predictions=requests,
                pneumonia=share * requests, histogram=np.asarray(hist, dtype=float))


def test_chi_squared_tests_tell_equal_from_shifted_distributions():
    rng = np.random.default_rng(1)
    a = np.bincount(np.searchsorted(BINS, rng.beta(2, 3, 500)), minlength=10)[:10].astype(float)
    b = np.bincount(np.searchsorted(BINS, rng.beta(2, 3, 500)), minlength=10)[:10].astype(float)
    shifted = np.bincount(np.searchsorted(BINS, rng.beta(3, 2, 500)), minlength=10)[:10].astype(float)
    assert homogeneity_p(a, b) > 0.01
    assert homogeneity_p(a, shifted) < 1e-6
    assert homogeneity_p(np.ones(10), np.ones(10)) is None  # too few counts to say anything
    reference = (a / a.sum()).tolist()
    assert goodness_of_fit_p(b, reference) > 0.01 and goodness_of_fit_p(shifted, reference) < 1e-6


def test_a_canary_like_the_stable_is_healthy():
    verdict = judge(side("6"), side("7", seed=1), RolloutSettings())
    assert verdict.status == "healthy", verdict.lines()
    assert verdict.lines()[-1] == "verdict: HEALTHY"


@pytest.mark.parametrize("canary, check", [
    (dict(errors=30), "5xx ratio"),
    (dict(p99=3.0), "p99 latency"),
    (dict(p99=0.9), "p99 latency"),  # under the 2 s target but 1.8 x the stable's
    (dict(rejections=100), "rejection ratio"),
    (dict(share=0.7), "PNEUMONIA share"),
])
def test_a_worse_canary_is_named_with_its_numbers_and_threshold(canary, check):
    verdict = judge(side("6"), side("7", seed=1, **canary), RolloutSettings())
    assert verdict.status == "worse"
    failed = [line for line in verdict.lines() if line.startswith("  FAIL")]
    assert len(failed) == 1 and check in failed[0] and "max" in failed[0], verdict.lines()


def test_a_shifted_probability_distribution_fails_against_stable_and_its_reference():
    rng = np.random.default_rng(3)
    shifted = np.bincount(np.searchsorted(BINS, rng.beta(4, 2, 2000)), minlength=10)[:10]
    stable = side("6")
    reference = {"6": {"probability_histogram": stable.histogram.tolist()},
                 "7": {"probability_histogram": stable.histogram.tolist()}}
    verdict = judge(stable, side("7", hist=shifted), RolloutSettings(), reference)
    failed = {name for name, _, ok in verdict.checks if not ok}
    assert failed == {"probability distribution vs stable", "probability distribution vs reference"}


def test_too_few_canary_requests_is_inconclusive_not_healthy():
    verdict = judge(side("6"), side("7", requests=10, seed=1), RolloutSettings())
    assert verdict.status == "inconclusive" and not verdict.healthy


@pytest.mark.integration
def test_evaluation_stores_the_reference_and_registration_tags_it_with_the_gate(tiny_model, tmp_path):
    from model.bundle import Bundle
    from model.registry import connect, evaluation_gate, log_and_register

    reference = tiny_model.report["reference"]
    holdout = tiny_model.report["splits"]["holdout"]
    assert reference["split"] == "holdout" and reference["n"] == holdout["n"] == sum(reference["probability_histogram"])
    assert reference["bins"] == list(BINS)
    bundle = Bundle.load(tiny_model.eval_dir / "bundle")
    assert bundle.meta["reference"] == reference  # in the bundle, under its hash

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registration = log_and_register(tiny_model.bundle, tiny_model.report, [], {}, tracking_uri=uri,
                                    model_name="pneumonia", promotion="never")
    tags = connect(uri).get_model_version("pneumonia", registration.version).tags
    assert json.loads(tags["reference_distribution"]) == reference
    assert tags["evaluation_gate"] == evaluation_gate(tiny_model.report)
    report = {"splits": {"val": {"auc": 0.95}, "holdout": {"auc": 0.6}}}
    assert evaluation_gate(report) == "failed: holdout AUC 0.600 < 0.75"
    assert evaluation_gate({"splits": {"val": {"auc": 0.9}}}) == "passed"
