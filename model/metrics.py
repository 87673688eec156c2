"""Classification metrics with bootstrap CIs, calibration, threshold choice and the champion test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata

METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "f1", "brier", "ece")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; ties count one half."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(probs[mask].mean() - labels[mask].mean())
    return float(error)


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs >= threshold
    tp = int(np.sum(pred & (labels == 1)))
    tn = int(np.sum(~pred & (labels == 0)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0
    return {
        "auc": auc(labels, probs),
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "sensitivity": sens,
        "specificity": spec,
        "f1": 2 * prec * sens / (prec + sens) if prec + sens and not math.isnan(sens) else 0.0,
        "brier": float(np.mean((probs - labels) ** 2)),
        "ece": expected_calibration_error(labels, probs),
        "n": int(len(labels)),
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
    }


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap CI for each metric, resampling within each class (keeps prevalence)."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    samples = {m: [] for m in METRIC_NAMES}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values = binary_metrics(labels[idx], probs[idx], threshold)
        for m in METRIC_NAMES:
            samples[m].append(values[m])
    return {m: [float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2)))]
            for m, v in samples.items()}


def metrics_with_ci(labels, probs, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    point = binary_metrics(labels, probs, threshold)
    if n_boot and 0 < int(np.sum(labels)) < len(labels):
        point["ci95"] = bootstrap_ci(labels, probs, threshold, n_boot, seed)
    point["threshold"] = threshold
    return point


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of sigmoid(logit / T) (Guo et al., 2017)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Temperature T and bias b minimising the NLL of sigmoid(logit / T + b) (Platt scaling).

    Temperature alone cannot undo a prior shift, and ``pos_weight`` in the training loss shifts every
    logit by about log(pos_weight); the bias absorbs that, T fixes over/under-confidence.
    """
    from scipy.optimize import minimize

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)

    def nll(params: np.ndarray) -> float:
        z = logits * math.exp(-params[0]) + params[1]
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    result = minimize(nll, x0=np.array([0.0, 0.0]), method="L-BFGS-B",
                      bounds=[(math.log(0.05), math.log(20.0)), (-10.0, 10.0)])
    return float(math.exp(result.x[0])), float(result.x[1])


def choose_threshold(labels: np.ndarray, probs: np.ndarray, method: str = "youden",
                     target_sensitivity: float = 0.95) -> float:
    """Operating threshold from validation data only.

    ``youden``: maximise sensitivity + specificity - 1. ``sensitivity``: the highest threshold whose
    sensitivity is at least ``target_sensitivity``.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    candidates = np.unique(probs)
    pos, neg = labels == 1, labels == 0
    sens = np.array([(probs[pos] >= t).mean() for t in candidates])
    spec = np.array([(probs[neg] < t).mean() for t in candidates])
    if method == "youden":
        best = np.flatnonzero((sens + spec) == (sens + spec).max())
        # Among ties, the midpoint of the plateau is the most robust to a shifted test distribution.
        i = best[len(best) // 2]
    elif method == "sensitivity":
        ok = np.flatnonzero(sens >= target_sensitivity)
        i = ok[-1] if len(ok) else 0
    else:
        raise ValueError(f"unknown threshold method {method!r} (use youden or sensitivity)")
    # Halfway to the next lower score: the decision does not hinge on one validation image.
    lower = probs[probs < candidates[i]]
    return float((candidates[i] + lower.max()) / 2) if len(lower) else float(candidates[i])


def paired_bootstrap_auc(labels: np.ndarray, probs_new: np.ndarray, probs_old: np.ndarray,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """Does the new model's AUC beat the old one's on the same cases? One-sided bootstrap p-value.

    ``n_boot`` < 1 (``--n-bootstrap 0``): no resampling, so no evidence: no interval and p = 1."""
    labels = np.asarray(labels).astype(int)
    if n_boot < 1:
        return {"auc_new": auc(labels, probs_new), "auc_old": auc(labels, probs_old),
                "delta": float(auc(labels, probs_new) - auc(labels, probs_old)), "delta_ci95": None,
                "p_value": 1.0, "n": int(len(labels))}
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    deltas = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        deltas[b] = auc(labels[idx], probs_new[idx]) - auc(labels[idx], probs_old[idx])
    return {
        "auc_new": auc(labels, probs_new),
        "auc_old": auc(labels, probs_old),
        "delta": float(auc(labels, probs_new) - auc(labels, probs_old)),
        "delta_ci95": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))],
        "p_value": float((np.sum(deltas <= 0) + 1) / (n_boot + 1)),
        "n": int(len(labels)),
    }


def save_plots(labels: np.ndarray, probs: np.ndarray, threshold: float, out_dir: str | Path,
               title: str = "validation") -> dict[str, Path]:
    """ROC curve, confusion matrix and reliability diagram as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).astype(int)
    paths = {}

    fpr, tpr, _ = roc_curve(labels, probs)
    m = binary_metrics(labels, probs, threshold)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUC {m['auc']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.scatter([1 - m["specificity"]], [m["sensitivity"]], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({title})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths["roc"] = out / "roc.png"
    fig.savefig(paths["roc"], dpi=100)
    plt.close(fig)

    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["NORMAL", "PNEUMONIA"], yticklabels=["NORMAL", "PNEUMONIA"],
           xlabel="predicted", ylabel="true", title=f"Confusion ({title})")
    fig.tight_layout()
    paths["confusion"] = out / "confusion_matrix.png"
    fig.savefig(paths["confusion"], dpi=100)
    plt.close(fig)

    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, 9)
    conf = [np.mean(probs[which == b]) for b in range(10) if np.any(which == b)]
    freq = [np.mean(labels[which == b]) for b in range(10) if np.any(which == b)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot(conf, freq, "o-", lw=2, label=f"ECE {m['ece']:.3f}")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=f"Calibration ({title})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    paths["calibration"] = out / "calibration.png"
    fig.savefig(paths["calibration"], dpi=100)
    plt.close(fig)
    return paths


def roc_points(labels: np.ndarray, probs: np.ndarray, max_points: int = 200) -> dict:
    """Thinned ROC points (for KFP's ClassificationMetrics)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(labels, probs)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).astype(int))
    thr = np.clip(thr[keep], 0.0, 1.0)
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "thresholds": thr.tolist()}


def abstention_metrics(labels: np.ndarray, probs: np.ndarray, low: float, high: float) -> dict:
    """Decisions with a "refer to a radiologist" band: NORMAL below ``low``, PNEUMONIA at or above ``high``,
    referred in between. Coverage = share decided; sensitivity/specificity (and the error rate, ``decided_risk``)
    over the decided cases only."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    decided = (probs < low) | (probs >= high)
    pos, neg = decided & (labels == 1), decided & (labels == 0)
    return {
        "low": float(low), "high": float(high), "n": int(len(labels)),
        "coverage": float(decided.mean()) if len(labels) else float("nan"),
        "referred": int((~decided).sum()),
        "sensitivity": float((probs[pos] >= high).mean()) if pos.any() else float("nan"),
        "specificity": float((probs[neg] < low).mean()) if neg.any() else float("nan"),
        # error rate among the decided films: the band's point on the risk-coverage curve
        "decided_risk": float(((probs[pos] < low).sum() + (probs[neg] >= high).sum()) / decided.sum())
        if decided.any() else float("nan"),
    }


def choose_abstention_band(labels: np.ndarray, probs: np.ndarray, threshold: float, target: float = 0.97,
                           grid: int = 60) -> tuple[float, float]:
    """The narrowest band around ``threshold`` (most cases decided) whose decided cases reach ``target``
    sensitivity AND specificity on these (calibration-set) probabilities; the widest one tried if none does."""
    probs = np.asarray(probs, dtype=np.float64)
    below, above = probs[probs < threshold], probs[probs >= threshold]
    lows = np.unique(np.concatenate([[threshold], np.quantile(below, np.linspace(0, 1, grid))])) if len(below) \
        else np.array([threshold])
    highs = np.unique(np.concatenate([[threshold], np.quantile(above, np.linspace(0, 1, grid))])) if len(above) \
        else np.array([threshold])
    best, best_coverage = (float(lows.min()), float(np.nextafter(highs.max(), np.inf))), -1.0
    for low in lows:
        for high in highs:
            m = abstention_metrics(labels, probs, low, high)
            if m["sensitivity"] >= target and m["specificity"] >= target and m["coverage"] > best_coverage:
                best, best_coverage = (float(low), float(high)), m["coverage"]
    return best


def risk_coverage(labels: np.ndarray, probs: np.ndarray, threshold: float, points: int = 101) -> dict:
    """The risk-coverage curve of decisions at ``threshold`` that refer the least confident films first.

    Confidence is the distance of the film's log-odds from the threshold's, ``|logit(p) - logit(threshold)|``: each
    coverage c keeps the c x n most confident films, a band symmetric in log-odds around the threshold. Risk = the
    error rate among the films kept. Returns the curve at ``points`` coverages (0 excluded), the area under it
    (AURC: the mean risk over all n coverages k/n, lower is better) and the full-coverage risk."""
    labels = np.asarray(labels).astype(int)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    n = len(labels)
    if n == 0:
        return {"coverage": [], "risk": [], "aurc": float("nan"), "risk_at_full_coverage": float("nan"), "n": 0}
    t = min(max(float(threshold), 1e-12), 1 - 1e-12)
    confidence = np.abs(np.log(probs / (1 - probs)) - np.log(t / (1 - t)))
    order = np.argsort(-confidence, kind="stable")
    errors = ((probs[order] >= threshold).astype(int) != labels[order]).astype(np.float64)
    risk_at = np.cumsum(errors) / np.arange(1, n + 1)  # risk when the k most confident films are decided
    # round first: 0.6 x 5 is 3.0000000000000004 in floating point, which must keep 3 films, not 4
    kept = np.unique(np.clip(np.ceil(np.round(np.linspace(0, 1, points)[1:] * n, 9)).astype(int), 1, n))
    return {"coverage": (kept / n).tolist(), "risk": risk_at[kept - 1].tolist(), "aurc": float(risk_at.mean()),
            "risk_at_full_coverage": float(risk_at[-1]), "n": int(n)}


def save_risk_coverage_plot(curves: dict[str, dict], bands: dict[str, dict], path: str | Path) -> Path:
    """Risk-coverage curves per split, with the refer band's own point (coverage, 1 - decided accuracy) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for split, curve in curves.items():
        if not curve["coverage"]:
            continue
        line, = ax.plot(curve["coverage"], curve["risk"], lw=2, label=f"{split} (AURC {curve['aurc']:.3f})")
        band = bands.get(split)
        if band and band.get("decided_risk") is not None and np.isfinite(band["decided_risk"]):
            ax.scatter([band["coverage"]], [band["decided_risk"]], color=line.get_color(), marker="D", zorder=3)
    ax.set(xlabel="coverage (share of films decided)", ylabel="risk (error rate among decided films)",
           title="Risk-coverage (diamond: the refer band)", xlim=(0, 1.02))
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
