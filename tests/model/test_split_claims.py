"""The split's claims, recomputed from what ``data prepare`` wrote (``manifest.csv``, ``images.npy``,
``summary.json``), never from the code's own summary of itself:

- every split's positive rate is within +-0.05 of the pool's;
- the val and holdout shares match the configured fractions;
- no patient is in two splits;
- the normalisation mean and std come from the train rows only.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from claims_fixtures import synthetic_kaggle
from conftest import make_kaggle_subset
from model.data import SplitFractions, SourceImage, prepare, split_by_patient
from numerics import U32

POOL_SPLITS = ("train", "val", "holdout")


def read_manifest(cache: Path) -> list[dict]:
    with (cache / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def synthetic_pool(n_patients: int = 400, positive_share: float = 0.73, seed: int = 0) -> list[SourceImage]:
    """Patients with 1-4 images each, ~73 % pneumonia like the real training split."""
    rng = np.random.default_rng(seed)
    pool = []
    for p in range(n_patients):
        label = int(rng.random() < positive_share)
        for i in range(int(rng.integers(1, 5))):
            pool.append(SourceImage(f"p{p}/img{i}.png", label, "train", f"patient{p}", "x"))
    return pool


@pytest.mark.parametrize("val, holdout, seed", [
    (0.15, 0.10, 42),  # the defaults
    (0.20, 0.10, 1),
    (0.30, 0.00, 2),
    (0.25, 0.15, 3),
    (0.40, 0.10, 4),
    (0.10, 0.30, 5),
])
def test_split_shares_and_positive_rates_match_the_configuration(val, holdout, seed):
    pool = synthetic_pool(seed=seed)
    assignment = split_by_patient(pool, SplitFractions(val=val, holdout=holdout, seed=seed))
    labels = np.array([img.label for img in pool])
    pool_rate = labels.mean()
    for split, fraction in (("val", val), ("holdout", holdout), ("train", 1 - val - holdout)):
        members = np.array([assignment[img.key] == split for img in pool])
        share = members.mean()
        # patients hold up to 4 images: a grouped split cannot hit a fraction to the image
        assert share == pytest.approx(fraction, abs=0.02), f"{split} holds {share:.3f} of the pool, not {fraction}"
        if fraction:
            rate = labels[members].mean()
            assert abs(rate - pool_rate) <= 0.05, f"{split} positive rate {rate:.3f} vs pool {pool_rate:.3f}"


def test_split_assigns_whole_patients():
    pool = synthetic_pool(seed=9)
    assignment = split_by_patient(pool, SplitFractions(val=0.15, holdout=0.10, seed=9))
    sides = defaultdict(set)
    for img in pool:
        sides[img.patient].add(assignment[img.key])
    assert all(len(s) == 1 for s in sides.values())


def _check_manifest(cache: Path, fractions: SplitFractions, rate_tolerance: float, share_tolerance: float):
    rows = read_manifest(cache)
    patients = defaultdict(set)
    for row in rows:
        patients[row["split"]].add(row["patient"])
    splits = sorted(patients)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            shared = patients[a] & patients[b]
            assert not shared, f"patients in both {a} and {b}: {sorted(shared)[:5]}"
    pool = [r for r in rows if r["split"] in POOL_SPLITS]
    pool_rate = np.mean([int(r["label"]) for r in pool])
    for split, fraction in (("val", fractions.val), ("holdout", fractions.holdout)):
        members = [r for r in pool if r["split"] == split]
        assert len(members) / len(pool) == pytest.approx(fraction, abs=share_tolerance), split
        rate = np.mean([int(r["label"]) for r in members])
        assert abs(rate - pool_rate) <= rate_tolerance, f"{split}: positive rate {rate:.3f} vs pool {pool_rate:.3f}"
    return rows


def test_prepared_manifest_has_no_patient_in_two_splits_and_stratified_shares(tmp_path):
    data = synthetic_kaggle(tmp_path / "data", {"NORMAL": 60, "PNEUMONIA": 140}, official={"test": 6, "val": 2})
    fractions = SplitFractions(val=0.15, holdout=0.10, seed=7)
    prepare(str(data), tmp_path / "cache", 64, fractions, workers=1)
    rows = _check_manifest(tmp_path / "cache", fractions, 0.05, 0.03)
    assert {r["split"] for r in rows} == {"train", "val", "holdout", "test", "sanity"}


def test_real_xrays_manifest_has_no_patient_in_two_splits(tmp_path, shared_224):
    """The real file names (personN_bacteria_M, IM-NNNN-MMMM): patients recomputed from manifest.csv."""
    data = make_kaggle_subset(tmp_path / "data", per_class=150)
    fractions = SplitFractions(val=0.2, holdout=0.1, seed=3)
    prepare(str(data), tmp_path / "cache", 64, fractions, workers=2)
    _check_manifest(tmp_path / "cache", fractions, 0.05, 0.04)


def test_normalisation_statistics_come_from_the_train_rows_only(tmp_path):
    data = synthetic_kaggle(tmp_path / "data", {"NORMAL": 20, "PNEUMONIA": 30}, official={"test": 10}, seed=3)
    # the official test images are much brighter: counting them would move the statistics a lot
    for path in (data / "test").rglob("*.png"):
        from PIL import Image

        path.write_bytes(_bright(np.asarray(Image.open(path))))
    prepare(str(data), tmp_path / "cache", 64, SplitFractions(val=0.2, holdout=0.1, seed=0), workers=1)
    rows = read_manifest(tmp_path / "cache")
    images = np.load(tmp_path / "cache" / "images.npy").astype(np.float64) / 255.0
    train = images[[int(r["index"]) for r in rows if r["split"] == "train"]]
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())["preprocess"]
    # data prepare rounds them to 6 decimals (5e-7) after float32 statistics over n pixels in [0, 1]: numpy's
    # pairwise sums err by at most (log2 n + 2) u relative, the standard deviation's square root halves that
    allowed = 5e-7 + (np.log2(train.size) + 2) * U32
    assert summary["mean"] == pytest.approx(train.mean(), abs=allowed)
    assert summary["std"] == pytest.approx(train.std(), abs=allowed)
    for other in ({"train", "val"}, {"train", "val", "holdout", "test", "sanity"}):
        rows_other = images[[int(r["index"]) for r in rows if r["split"] in other]]
        assert abs(rows_other.mean() - train.mean()) > 2 * allowed, "the check cannot tell the splits apart"


def _bright(pixels: np.ndarray) -> bytes:
    from claims_fixtures import png

    return png(np.clip(pixels.astype(int) + 80, 0, 255).astype(np.uint8))
