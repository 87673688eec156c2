"""K-fold cross-validation (`pneumoscope train --folds K`), the refer band and the generalisation candidates."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from model.folds import assign_folds, cross_validate, inner_val
from model.metrics import abstention_metrics, choose_abstention_band
from model.preprocessing import PreprocessConfig, apply_field_mask, field_mask, normalize, resize
from model.profiles import get_profile
from model.transforms import BorderErasing, TrainTransform
from tests.model.test_cli import one_error_line, run_cli
from tests.model.test_training_ddp import _synthetic_cache


def _pool(n_patients: int = 90):
    labels, patients = [], []
    for p in range(n_patients):
        for _ in range(1 + p % 4):
            labels.append(int(p % 4 != 0))
            patients.append(f"patient{p}")
    return np.array(labels), np.array(patients)


def test_folds_keep_patients_together_and_classes_balanced():
    labels, patients = _pool()
    folds = assign_folds(labels, patients, 3, seed=5)
    where = defaultdict(set)
    for fold, patient in zip(folds, patients):
        where[patient].add(int(fold))
    assert all(len(f) == 1 for f in where.values()), "a patient's images landed in two folds"
    assert set(folds.tolist()) == {0, 1, 2}
    shares = [labels[folds == f].mean() for f in range(3)]
    assert max(shares) - min(shares) < 0.12
    assert np.array_equal(folds, assign_folds(labels, patients, 3, seed=5))
    inner = inner_val(labels, patients, 0.15, seed=1)
    assert not set(patients[inner]) & set(patients[~inner])
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(labels, patients, 1, seed=0)


def test_refer_band_trades_coverage_for_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    probs = np.clip(labels * 0.35 + rng.normal(0.33, 0.18, 2000), 0, 1)  # overlapping classes
    full = abstention_metrics(labels, probs, 0.5, 0.5)
    assert full["coverage"] == 1.0 and full["referred"] == 0
    low, high = choose_abstention_band(labels, probs, 0.5, target=0.95)
    banded = abstention_metrics(labels, probs, low, high)
    assert low <= 0.5 <= high and 0.0 < banded["coverage"] < 1.0
    assert banded["sensitivity"] >= 0.95 and banded["specificity"] >= 0.95
    assert full["sensitivity"] < 0.95 or full["specificity"] < 0.95


@pytest.mark.integration
def test_cross_validation_scores_every_image_out_of_fold(tmp_path):
    cache = _synthetic_cache(tmp_path, per_class=24)
    profile = get_profile("smoke", image_size=32, batch_size=8, num_workers=0, erase_borders=0.5,
                          field_mask="ellipse")
    report = cross_validate(cache, tmp_path / "cv", profile, k=2, seed=1)
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    oof = saved["oof"]
    assert len(oof["logit"]) == report["n_pool"] and all(np.isfinite(oof["logit"]))
    assert sorted(set(oof["fold"])) == [0, 1]
    assert [f["fold"] for f in saved["per_fold"]] == [1, 2]
    for fold in saved["per_fold"]:
        assert 0.0 <= fold["auc"] <= 1.0 and fold["n"] > 0
    assert set(saved["mean_sd"]) >= {"auc", "sensitivity", "specificity", "ece"}
    assert 0.0 <= saved["abstention"]["coverage_mean"] <= 1.0
    for fold in (1, 2):  # one model per fold, trained with the candidate options
        import torch

        meta = torch.load(tmp_path / "cv" / f"fold{fold}" / "checkpoint.pt", weights_only=False)
        assert meta["profile"]["field_mask"] == "ellipse" and meta["preprocess"]["field_mask"] == "ellipse"


def test_cli_refuses_one_fold_in_one_line(tmp_path):
    cache = _synthetic_cache(tmp_path, per_class=10)
    line = one_error_line(run_cli("train", "--cache", str(cache), "--out", str(tmp_path / "o"), "--profile", "smoke",
                                  "--folds", "1"))
    assert "at least 2 folds" in line


def test_field_mask_blanks_outside_the_lung_field_in_training_and_serving_alike():
    config = PreprocessConfig(image_size=64, mean=0.5, std=0.25, field_mask="ellipse")
    pixels = np.full((64, 64), 250, np.uint8)
    inside = field_mask(64, 64)
    assert inside[32, 32] and not inside[0, 0] and not inside[0, 63] and 0.55 < inside.mean() < 0.8
    served = normalize(pixels, config)[0, 0]
    # outside: the uint8 nearest the mean (128 for 0.5), i.e. ~0 once normalised
    assert np.all(np.abs(served[~inside]) < 0.01) and np.all(served[inside] > 1.9)
    trained = TrainTransform(config, strength=0.0)  # no augmentation left but the flip
    assert np.all(trained.pixels(pixels)[~inside] == 128)
    assert np.array_equal(apply_field_mask(pixels, PreprocessConfig()), pixels)


def test_aspect_preserving_resize_pads_instead_of_squashing():
    wide = np.full((100, 200), 200, np.uint8)
    padded = resize(wide, PreprocessConfig(image_size=64, resize_mode="pad"))
    assert padded.shape == (64, 64)
    assert np.all(padded[:15] == 0) and np.all(padded[-15:] == 0) and np.all(padded[20:44] == 200)
    assert np.all(resize(wide, PreprocessConfig(image_size=64)) == 200)


def test_border_erasing_only_touches_the_border_band():
    pixels = np.full((64, 64), 100, np.uint8)
    erase = BorderErasing(band=0.2, p=1.0)
    touched = np.zeros((64, 64), bool)
    for seed in range(40):
        erase.set_random_seed(seed)
        touched |= erase(image=pixels)["image"] != 100
    assert touched.any()
    assert not touched[16:48, 16:48].any(), "a patch reached the centre of the film"
