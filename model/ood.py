"""The out-of-distribution detector: how far a film's early-layer statistics lie from the training films'.

The exported graph's third output, ``features`` [N, 512], holds layer1's 256 channels summarised over space: their
means, then their standard deviations (``model.network.LogitCamAndFeatures``). They describe the film's textures
and contrast as the network first sees them. The pooled layer4 vector the classifier's head reads was the first
candidate; measured on a proxy of other sources (``lung_masks_256``: adults from many hospitals) it flagged 15 %
of them against 77 % for layer1's statistics, at the same rate on val and no more on blurred, cropped, rotated or
contrast-changed films (BENCHMARKS.md, "Intended use"): the deep features keep what tells pneumonia apart and
lose what tells a hospital's films apart. The detector, fitted at export on the training split's features through
the exported fp32 graph, is a class-conditional Gaussian with one shared covariance (Lee et al., NeurIPS 2018):

- the mean of each class's training features (NORMAL, PNEUMONIA);
- one covariance shared by the classes: the within-class scatter, shrunk towards a scaled identity by
  Ledoit-Wolf. Some channels barely vary over the training films; the shrinkage keeps the covariance invertible
  without a hand-set ridge;
- its whitening ``W = V diag(lambda)^-1/2`` (``covariance = V diag(lambda) V^T``), so that the Mahalanobis
  distance becomes a Euclidean one: ``d_c(f) = |(f - centre) W - (mean_c - centre) W|``, one [512 x 512]
  product per film (a quarter of a million multiply-adds, next to the network's ~1.3 GFLOP at 128 px).

The distance is the smallest over the classes (a film near either class is a film the model knows).

**Cut-off rule**: the ``quantile`` (default 0.975) of the distances of the val split, which training never saw:
by construction about 2.5 % of in-distribution films are flagged (the holdout split measures it). Nothing else
chooses it: ``external_nih_224`` and every other validation-only set stay out of the fit.

**Served score**: ``ood_score = distance / cut-off``, so that 1.0 is the boundary for every model version
(a film is outside the intended use above 1).

**Precision tolerance**: an engine or precision that moves the score by ``delta`` can flip only films whose score
lies within ``delta`` of 1. :func:`score_tolerance` takes the largest ``delta`` for which that band holds at most
``flip_share`` (default 1 %) of the val films; the engine parity gate (:mod:`model.engine_gate`) refuses a
candidate that moves any gate film's score by more.

numpy only at module level: the predictor imports this module (the serving image has no scipy or scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.bundle import BundleError

OOD_FILE = "ood.npz"
METHOD = "mahalanobis-class-conditional-ledoit-wolf-on-layer1-statistics"
DEFAULT_QUANTILE = 0.975
DEFAULT_FLIP_SHARE = 0.01
FEATURES_OUTPUT = "features"


@dataclass(frozen=True)
class OodDetector:
    """The fitted statistics, and the score of a batch of feature vectors."""

    centre: np.ndarray  # float32 [d]: the mean of the class means (keeps the projected values small)
    projection: np.ndarray  # float32 [d, d]: the whitening W of the shared covariance
    class_centres: np.ndarray  # float64 [C, d]: (mean_c - centre) W
    cutoff: float  # the distance that scores 1.0

    @property
    def dimensions(self) -> int:
        return int(self.projection.shape[0])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance [N] of each feature vector to the nearest class mean (float64)."""
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.dimensions:
            raise ValueError(f"features must be [N, {self.dimensions}], got {list(f.shape)}")
        z = (f - self.centre) @ self.projection  # one product for every class
        squared = ((z[:, None, :].astype(np.float64) - self.class_centres[None]) ** 2).sum(axis=2)
        return np.sqrt(squared.min(axis=1))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``ood_score`` [N]: the distance in units of the cut-off (above 1: outside the intended use)."""
        return self.distances(features) / self.cutoff

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / OOD_FILE
        np.savez(path, centre=self.centre, projection=self.projection, class_centres=self.class_centres,
                 cutoff=np.array(self.cutoff))
        return path

    @classmethod
    def load(cls, bundle) -> "OodDetector | None":
        """The bundle's detector, or None for a bundle exported before the detector existed."""
        spec = (bundle.meta.get("intended_use") or {}).get("ood")
        if not spec:
            return None
        name = spec.get("file", OOD_FILE)
        data = bundle.arrays(name, "the out-of-distribution statistics")
        try:
            detector = cls(data["centre"].astype(np.float32), data["projection"].astype(np.float32),
                           data["class_centres"].astype(np.float64), float(data["cutoff"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the out-of-distribution statistics {name} are malformed: {exc}") from None
        d = detector.dimensions
        if (detector.centre.shape != (d,) or detector.projection.shape != (d, d)
                or detector.class_centres.ndim != 2 or detector.class_centres.shape[1] != d
                or not detector.cutoff > 0):
            raise BundleError(f"the out-of-distribution statistics {name} are malformed")
        if abs(detector.cutoff - float(spec["cutoff"])) > 1e-6 * detector.cutoff:
            raise BundleError(f"the cut-off in {name} differs from the one in the bundle's metadata")
        return detector


def fit_statistics(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(centre, projection, class_centres, facts) from the training features and labels."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 1 or len(x) < 2:
        raise ValueError("the out-of-distribution statistics need at least two training films")
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    within = x - means[np.searchsorted(classes, labels)]
    shrunk = LedoitWolf(assume_centered=True).fit(within)
    eigenvalues, eigenvectors = np.linalg.eigh(shrunk.covariance_)
    # Ledoit-Wolf keeps every eigenvalue at least shrinkage x mean variance; the floor only guards a zero matrix.
    eigenvalues = np.maximum(eigenvalues, max(float(eigenvalues.max()), 1e-12) * 1e-9)
    projection = eigenvectors / np.sqrt(eigenvalues)
    centre = means.mean(axis=0)
    class_centres = (means - centre) @ projection
    facts = {"classes": [int(c) for c in classes], "train_films": int(len(x)),
             "per_class": [int((labels == c).sum()) for c in classes], "dimensions": int(x.shape[1]),
             "shrinkage": float(shrunk.shrinkage_),
             "eigenvalue_range": [float(eigenvalues.min()), float(eigenvalues.max())]}
    return centre.astype(np.float32), projection.astype(np.float32), class_centres, facts


def cutoff_from_val(val_distances: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> float:
    """The cut-off rule: the ``quantile`` of the val split's distances (linear interpolation between films)."""
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"the cut-off quantile must be in [0.5, 1), not {quantile}")
    d = np.asarray(val_distances, dtype=np.float64)
    if len(d) == 0 or not np.all(np.isfinite(d)):
        raise ValueError("the cut-off needs finite val distances")
    return float(np.quantile(d, quantile))


def score_tolerance(val_scores: np.ndarray, flip_share: float = DEFAULT_FLIP_SHARE) -> float:
    """The largest ``delta`` such that fewer than ``flip_share`` of the val films score within ``delta`` of 1.

    A precision that moves every score by less than ``delta`` can change the verdict of no more than that share of
    in-distribution films."""
    gaps = np.sort(np.abs(np.asarray(val_scores, dtype=np.float64) - 1.0))
    if len(gaps) == 0:
        raise ValueError("the score tolerance needs val scores")
    k = int(np.floor(flip_share * len(gaps)))
    return float(gaps[min(k, len(gaps) - 1)])


def fit_detector(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                 quantile: float = DEFAULT_QUANTILE, flip_share: float = DEFAULT_FLIP_SHARE
                 ) -> tuple[OodDetector, dict]:
    """Fit on train, cut on val; returns the detector and the metadata the bundle records under
    ``intended_use.ood``."""
    centre, projection, class_centres, facts = fit_statistics(train_features, train_labels)
    unscaled = OodDetector(centre, projection, class_centres, 1.0)
    val_distances = unscaled.distances(val_features)
    cutoff = cutoff_from_val(val_distances, quantile)
    detector = OodDetector(centre, projection, class_centres, cutoff)
    val_scores = val_distances / cutoff
    tolerance = score_tolerance(val_scores, flip_share)
    meta = {"method": METHOD, "file": OOD_FILE, "output": FEATURES_OUTPUT, "cutoff": cutoff,
            "rule": f"cut-off = the {quantile:g} quantile of the val split's distances; ood_score = distance / "
                    "cut-off, above 1 = outside the intended use",
            "quantile": quantile, "val_films": int(len(val_distances)),
            "val_flagged_share": float((val_scores > 1.0).mean()),
            "score_tolerance": tolerance, "flip_share": flip_share, **facts}
    return detector, meta
