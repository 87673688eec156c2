"""The decision every answer names (model.intended_use): the refer band, the out-of-distribution score, the age limit,
and ages as DICOM writes them."""

from __future__ import annotations

import math

import pytest

from model.intended_use import DecisionRule, InvalidAge, answer_summary, parse_age, view_reason

RULE = DecisionRule(threshold=0.6, band_low=0.4, band_high=0.8, age_limit_years=18.0)


@pytest.mark.parametrize("text, years", [("045Y", 45.0), ("004Y", 4.0), ("030M", 2.5), ("006W", 42 / 365.25),
                                         ("010D", 10 / 365.25), (" 018y ", 18.0), ("17.5", 17.5), (3, 3.0),
                                         (None, None), ("", None)])
def test_ages_are_read_as_dicom_age_strings_or_years(text, years):
    got = parse_age(text)
    assert got is None if years is None else got == pytest.approx(years)


@pytest.mark.parametrize("text", ["45 years", "Y045", "-3", "200Y", "nan", True])
def test_an_unreadable_age_is_refused_with_a_reason(text):
    with pytest.raises(InvalidAge, match="age") as refused:
        parse_age(text)
    assert str(text) not in str(refused.value)  # the value is not repeated: messages are logged


def test_inside_the_band_is_refer_uncertain_and_outside_it_the_label():
    # below the band: NORMAL; at or above its top: PNEUMONIA; in between (threshold included): REFER
    for p, decision in ((0.39, "NORMAL"), (0.4, "REFER"), (0.6, "REFER"), (0.7999, "REFER"), (0.8, "PNEUMONIA")):
        verdict = RULE.decide(p, 0.5, None)
        assert verdict.decision == decision, p
        assert verdict.in_intended_use  # an uncertain film is still within the intended use
        assert [r.code for r in verdict.refer_reasons] == (["uncertain"] if decision == "REFER" else [])


def test_a_film_outside_the_training_distribution_is_refer_and_outside_the_intended_use():
    verdict = RULE.decide(0.95, 1.7, None)
    assert (verdict.decision, verdict.in_intended_use) == ("REFER", False)
    (reason,) = verdict.refer_reasons
    assert reason.code == "out_of_distribution" and "1.70" in reason.text
    assert RULE.decide(0.95, 1.0, None).decision == "PNEUMONIA"  # the cut-off itself is inside


def test_a_patient_over_the_age_limit_is_refer_whatever_the_film():
    over = RULE.decide(0.05, 0.3, parse_age("045Y"))
    assert (over.decision, over.in_intended_use) == ("REFER", False)
    assert [r.code for r in over.refer_reasons] == ["age_over_limit"]
    assert "45" not in over.refer_reasons[0].text  # the patient's age is not repeated in the answer
    assert RULE.decide(0.05, 0.3, parse_age("004Y")).decision == "NORMAL"
    assert RULE.decide(0.05, 0.3, 18.0).decision == "NORMAL"  # the limit itself is within
    # every cause is named
    all_three = RULE.decide(0.5, 3.0, 70.0)
    assert [r.code for r in all_three.refer_reasons] == ["out_of_distribution", "age_over_limit", "uncertain"]


def test_a_version_without_a_detector_cannot_vouch_for_any_film():
    rule = DecisionRule.from_meta({"threshold": 0.5})
    assert (rule.band_low, rule.band_high, rule.has_detector) == (0.5, 0.5, False)
    verdict = rule.decide(0.99, None, None)
    assert (verdict.decision, verdict.in_intended_use) == ("REFER", False)
    assert [r.code for r in verdict.refer_reasons] == ["intended_use_unknown"]
    # with a detector, a film it could not score is not vouched for either
    assert RULE.decide(0.99, math.nan, None).refer_reasons[0].code == "out_of_distribution"


def test_the_rule_and_summary_come_from_the_bundle_metadata():
    meta = {"threshold": 0.6, "refer_band": {"low": 0.3, "high": 0.9},
            "intended_use": {"age_limit_years": 12, "ood": {"cutoff": 2.0}, "profile": "demo", "demonstration": True,
                             "registered": {"auc": 0.99, "ece_ci95": [0.01, float("nan")]}}}
    rule = DecisionRule.from_meta(meta)
    assert (rule.band_low, rule.band_high, rule.age_limit_years, rule.has_detector) == (0.3, 0.9, 12.0, True)
    assert rule.decide(0.1, 0.5, 13.0).decision == "REFER"
    summary = answer_summary(meta)
    assert summary["profile"] == "demo" and summary["demonstration"] is True
    assert summary["registered"]["ece_ci95"] == [0.01, None]  # JSON for every client: no NaN
    with pytest.raises(ValueError, match="must contain the threshold"):
        DecisionRule(threshold=0.9, band_low=0.1, band_high=0.5)


@pytest.mark.parametrize("view, referred", [("PA", False), ("AP", False), (" pa ", False), ("", False), (None, False),
                                            ("XYZ", False), ("LL", True), ("rl", True), ("LLD", True), ("RLO", True),
                                            ("LATERAL", True)])
def test_only_a_view_the_standard_names_as_not_frontal_is_a_reason_to_refer(view, referred):
    reason = view_reason(view)
    assert (reason is not None) == referred
    if referred:
        assert reason.code == "view_not_frontal" and "frontal" in reason.text
        assert " ".join(str(view).split()).upper() in reason.text
