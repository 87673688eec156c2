"""The out-of-distribution detector (model.ood) on synthetic features: the distance, the cut-off rule, the precision
tolerance, and its file in a bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.ood import OOD_FILE, OodDetector, cutoff_from_val, fit_detector, fit_statistics, score_tolerance


def _gaussian_classes(rng, n: int, d: int, shift: float = 3.0):
    """Two classes sharing one anisotropic covariance, means ``shift`` apart along the first axis."""
    scales = np.linspace(0.2, 3.0, d)
    labels = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) * scales
    x[:, 0] += shift * labels
    return x, labels, scales


def test_distance_is_the_mahalanobis_distance_to_the_nearest_class_under_the_shrunk_covariance():
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    x, labels, _ = _gaussian_classes(rng, 600, 12)
    centre, projection, class_centres, facts = fit_statistics(x, labels)
    detector = OodDetector(centre, projection, class_centres, 1.0)
    # The offline computation, written out: class means, Ledoit-Wolf on the within-class scatter, its inverse.
    means = np.stack([x[labels == c].mean(axis=0) for c in (0, 1)])
    inverse = np.linalg.inv(LedoitWolf(assume_centered=True).fit(x - means[labels]).covariance_)
    probes = np.concatenate([x[:20], rng.normal(size=(10, 12)) * 8])
    expected = np.array([min(mahalanobis(p, m, inverse) for m in means) for p in probes])
    # float32 storage of the centre and W: relative error of a few float32 epsilons times sqrt(d) terms
    np.testing.assert_allclose(detector.distances(probes), expected, rtol=1e-5 * np.sqrt(12))
    assert facts["classes"] == [0, 1] and facts["per_class"] == [int((labels == 0).sum()), int((labels == 1).sum())]


def test_the_cut_off_is_the_val_quantile_and_flags_that_share_of_val():
    rng = np.random.default_rng(1)
    train, train_y, scales = _gaussian_classes(rng, 2000, 8)
    val, _, _ = _gaussian_classes(rng, 1000, 8)
    detector, meta = fit_detector(train, train_y, val, quantile=0.975)
    distances = OodDetector(detector.centre, detector.projection, detector.class_centres, 1.0).distances(val)
    assert meta["cutoff"] == pytest.approx(np.quantile(distances, 0.975), rel=1e-12)
    assert detector.cutoff == meta["cutoff"]
    # 975 of 1000 val films are at or below the cut-off: exactly 25 score above 1 (no ties among real distances)
    assert int((detector.scores(val) > 1).sum()) == 25 and meta["val_flagged_share"] == 0.025
    # films from the same distribution are flagged at about the same rate; shifted ones nearly always
    fresh, _, _ = _gaussian_classes(rng, 4000, 8)
    assert 0.015 < (detector.scores(fresh) > 1).mean() < 0.035
    assert (detector.scores(fresh + 4 * scales) > 1).mean() > 0.99
    with pytest.raises(ValueError, match="quantile"):
        cutoff_from_val(distances, 1.0)


def test_nothing_but_train_and_val_enters_the_fit():
    """Adding far-away films to a third set changes nothing: the fit sees train (statistics) and val (cut-off)."""
    rng = np.random.default_rng(2)
    train, train_y, _ = _gaussian_classes(rng, 500, 6)
    val, _, _ = _gaussian_classes(rng, 300, 6)
    a, meta_a = fit_detector(train, train_y, val)
    b, meta_b = fit_detector(train.copy(), train_y.copy(), val.copy())
    assert meta_a == meta_b and np.array_equal(a.projection, b.projection)
    shifted_val = val + 1.0  # another val moves the cut-off, not the statistics
    c, meta_c = fit_detector(train, train_y, shifted_val)
    assert np.array_equal(c.projection, a.projection) and meta_c["cutoff"] != meta_a["cutoff"]


def test_precision_tolerance_bounds_the_share_of_val_verdicts_it_can_flip():
    # ten of 100 films score exactly 1: no band around the cut-off holds only 1 % of them, nothing may move a score
    scores = np.array([0.2, 0.5, 0.9, 0.97, 0.99, 1.0, 1.02, 1.05, 1.3, 2.0] * 10)
    assert score_tolerance(scores, 0.01) == 0.0
    spread = np.linspace(0.0, 2.0, 1001)  # gaps to 1 spread evenly: two films per 0.002
    t = score_tolerance(spread, 0.01)
    # the open band (1 - t, 1 + t) holds at most 1 % of the films, and no wider band does
    assert (np.abs(spread - 1) < t).sum() <= 0.01 * len(spread) < (np.abs(spread - 1) <= t).sum()
    # moving every score by less than t flips at most 1 % of the verdicts
    rng = np.random.default_rng(3)
    moved = spread + rng.uniform(-t, t, len(spread)) * 0.999
    assert ((moved > 1) != (spread > 1)).sum() <= 0.01 * len(spread)


def test_the_detector_file_is_read_back_and_checked_against_the_metadata(tmp_path):
    from model.bundle import Bundle, BundleError, write_bundle

    rng = np.random.default_rng(4)
    train, train_y, _ = _gaussian_classes(rng, 300, 5)
    detector, meta = fit_detector(train, train_y, train[:100])
    detector.save(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not used here")
    write_bundle(tmp_path, {"threshold": 0.5, "intended_use": {"ood": meta}})
    loaded = OodDetector.load(Bundle.load(tmp_path))
    np.testing.assert_array_equal(loaded.scores(train[:50]), detector.scores(train[:50]))
    # the file is hashed with the bundle: a changed cut-off inside it is refused
    np.savez(tmp_path / OOD_FILE, centre=detector.centre, projection=detector.projection,
             class_centres=detector.class_centres, cutoff=np.array(detector.cutoff * 2))
    with pytest.raises(BundleError, match=f"sha256 mismatch for {OOD_FILE}"):
        Bundle.load(tmp_path)
    # ... and re-hashing does not help: the metadata's cut-off must match the file's
    meta_file = json.loads((tmp_path / "pneumoscope.json").read_text())
    write_bundle(tmp_path, {k: v for k, v in meta_file.items() if k not in ("files", "bundle_sha256", "format")})
    with pytest.raises(BundleError, match="cut-off"):
        OodDetector.load(Bundle.load(tmp_path))
    # a bundle exported before the detector existed has none
    write_bundle(tmp_path, {"threshold": 0.5})
    assert OodDetector.load(Bundle.load(tmp_path)) is None
