"""Canary vs stable, from Prometheus: errors, latency, rejections and the prediction mix, with a verdict.

Each side is selected by the ``model_version`` label, which every scrape target carries (in a cluster the
PodMonitors copy it from the pod label ``pneumoscope.io/model-version``; the local canary's Prometheus
config sets it per target). Over one window (default 10m), per side:

- 5xx ratio: transformer responses with a 5xx code / all of its responses (``pneumoscope_requests_total``);
- p99 latency of the transformer's whole request (``pneumoscope_request_duration_seconds``);
- rejection ratio: requests refused before inference (``pneumoscope_input_rejections_total``) / requests;
- PNEUMONIA share (``pneumoscope_predictions_total``) and the probability histogram
  (``pneumoscope_probability``), compared between the sides with a chi-squared test of homogeneity on
  the histogram bins, and each side against the reference distribution evaluation stored with its
  version (a chi-squared goodness-of-fit test).

The canary is *worse* when it breaks a threshold of :class:`rollout.settings.RolloutSettings`; with fewer
than ``min_requests`` canary requests in the window the verdict is *inconclusive* (not healthy either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rollout.errors import RolloutError
from rollout.settings import RolloutSettings

#: The probability histogram's bucket bounds (serving.metrics.PROBABILITY); the reference uses the same bins.
BINS = [round(i / 10, 1) for i in range(1, 11)]


class Prometheus:
    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def query(self, promql: str) -> list[dict]:
        import httpx

        try:
            response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise RolloutError(f"cannot reach Prometheus at {self.url}: {str(exc) or type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            raise RolloutError(f"Prometheus at {self.url} answered HTTP {response.status_code} without JSON "
                               "(is that URL a Prometheus?)") from None
        if body.get("status") != "success":
            raise RolloutError(f"Prometheus at {self.url} refused a query: {body.get('error', response.status_code)}")
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if np.isnan(value) else value


def side_queries(version: str, window: str) -> dict[str, str]:
    t = f'component="transformer",model_version="{version}"'
    v = f'model_version="{version}"'
    return {
        "requests": f"sum(increase(pneumoscope_requests_total{{{t}}}[{window}]))",
        "errors": f'sum(increase(pneumoscope_requests_total{{{t},code=~"5.."}}[{window}]))',
        "p99": f"histogram_quantile(0.99, sum by (le) (rate(pneumoscope_request_duration_seconds_bucket{{{t}}}"
               f"[{window}])))",
        "rejections": f"sum(increase(pneumoscope_input_rejections_total{{{t}}}[{window}]))",
        "predictions": f'sum(increase(pneumoscope_predictions_total{{component="predictor",{v}}}[{window}]))',
        "pneumonia": f'sum(increase(pneumoscope_predictions_total{{component="predictor",{v},label="PNEUMONIA"}}'
                     f"[{window}]))",
    }


@dataclass
class Side:
    version: str
    requests: float = 0.0
    errors: float = 0.0
    p99: float | None = None
    rejections: float = 0.0
    predictions: float = 0.0
    pneumonia: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(BINS)))

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rejection_ratio(self) -> float:
        return self.rejections / self.requests if self.requests else 0.0

    @property
    def share(self) -> float | None:
        return self.pneumonia / self.predictions if self.predictions else None


def measure(prometheus: Prometheus, version: str, window: str) -> Side:
    side = Side(version)
    for name, promql in side_queries(version, window).items():
        setattr(side, name, prometheus.scalar(promql) if name == "p99" else (prometheus.scalar(promql) or 0.0))
    buckets = prometheus.query(f'sum by (le) (increase(pneumoscope_probability_bucket{{component="predictor",'
                                f'model_version="{version}"}}[{window}]))')
    cumulative = {float(b["metric"]["le"]): float(b["value"][1]) for b in buckets if b["metric"].get("le")}
    counts = [cumulative.get(edge, 0.0) for edge in BINS]
    side.histogram = np.diff(np.concatenate([[0.0], counts])).clip(min=0)
    return side


def _merge_sparse(observed: np.ndarray, expected: np.ndarray, minimum: float = 5.0):
    """Merge neighbouring bins until every expected count is >= ``minimum`` (the chi-squared approximation)."""
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed, expected):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= minimum:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc or o_acc:
        if exp:
            obs[-1] += o_acc
            exp[-1] += e_acc
        else:
            obs, exp = [o_acc], [e_acc]
    return np.array(obs), np.array(exp)


def homogeneity_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Chi-squared test that two binned samples come from one distribution (None: too few counts)."""
    from scipy.stats import chi2

    n_a, n_b = a.sum(), b.sum()
    if n_a < 20 or n_b < 20:
        return None
    pooled = (a + b) / (n_a + n_b)
    keep = pooled > 0
    a, b, pooled = a[keep], b[keep], pooled[keep]
    (oa, ea), (ob, eb) = _merge_sparse(a, pooled * n_a), _merge_sparse(b, pooled * n_b)
    if len(oa) != len(ob):  # merged differently: merge on the pooled counts instead
        oa, _ = _merge_sparse(a, pooled * (n_a + n_b))
        ob, _ = _merge_sparse(b, pooled * (n_a + n_b))
        both = oa + ob
        ea, eb = both * n_a / (n_a + n_b), both * n_b / (n_a + n_b)
    if len(oa) < 2:
        return 1.0
    stat = float((((oa - ea) ** 2) / ea).sum() + (((ob - eb) ** 2) / eb).sum())
    return float(chi2.sf(stat, len(oa) - 1))


def goodness_of_fit_p(observed: np.ndarray, reference: list[float]) -> float | None:
    """Chi-squared goodness of fit of binned counts to reference bin proportions (None: too few counts)."""
    from scipy.stats import chi2

    n = observed.sum()
    ref = np.asarray(reference, dtype=float)
    if n < 20 or ref.sum() <= 0 or len(ref) != len(observed):
        return None
    expected = ref / ref.sum() * n
    keep = expected > 0
    if observed[~keep].sum() > 0:
        return 0.0  # probabilities where the reference has none
    o, e = _merge_sparse(observed[keep], expected[keep])
    if len(o) < 2:
        return 1.0
    return float(chi2.sf(float((((o - e) ** 2) / e).sum()), len(o) - 1))


@dataclass
class Verdict:
    stable: Side
    canary: Side
    checks: list[tuple[str, str, bool]]  # (name, "value vs threshold", passed)
    status: str  # healthy | worse | inconclusive
    window: str

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    def summary(self) -> str:
        failed = [f"{name}: {text}" for name, text, ok in self.checks if not ok]
        return "; ".join(failed) or "every check passed"

    def lines(self) -> list[str]:
        out = [f"canary version {self.canary.version} vs stable version {self.stable.version} over {self.window}: "
               f"{self.canary.requests:.0f} vs {self.stable.requests:.0f} requests"]
        out += [f"  {'ok  ' if ok else 'FAIL'} {name}: {text}" for name, text, ok in self.checks]
        out.append(f"verdict: {self.status.upper()}")
        return out

    def to_dict(self) -> dict:
        def side(s: Side) -> dict:
            return {"version": s.version, "requests": s.requests, "error_ratio": s.error_ratio, "p99_seconds": s.p99,
                    "rejection_ratio": s.rejection_ratio, "pneumonia_share": s.share,
                    "probability_histogram": s.histogram.tolist()}
        return {"status": self.status, "window": self.window, "stable": side(self.stable),
                "canary": side(self.canary),
                "checks": [{"name": n, "detail": t, "passed": ok} for n, t, ok in self.checks]}


def judge(stable: Side, canary: Side, settings: RolloutSettings, references: dict | None = None) -> Verdict:
    s, c, checks = stable, canary, []
    limit = min(settings.max_error_ratio, s.error_ratio + settings.max_error_ratio_increase)
    checks.append(("5xx ratio", f"canary {c.error_ratio:.4f} vs stable {s.error_ratio:.4f} (max {limit:.4f})",
                   c.error_ratio <= limit))
    if c.p99 is None:
        checks.append(("p99 latency", "no canary latency data", False))
    else:
        p99_limit = settings.max_p99_seconds if s.p99 is None else min(settings.max_p99_seconds,
                                                                         s.p99 * settings.max_p99_ratio)
        stable_p99 = "n/a" if s.p99 is None else f"{s.p99:.3f} s"
        checks.append(("p99 latency", f"canary {c.p99:.3f} s vs stable {stable_p99} (max {p99_limit:.3f} s)",
                       c.p99 <= p99_limit))
    rej_limit = s.rejection_ratio + settings.max_rejection_ratio_increase
    checks.append(("rejection ratio", f"canary {c.rejection_ratio:.4f} vs stable {s.rejection_ratio:.4f} "
                                      f"(max {rej_limit:.4f})", c.rejection_ratio <= rej_limit))
    if c.share is not None and s.share is not None:
        diff = abs(c.share - s.share)
        checks.append(("PNEUMONIA share", f"canary {c.share:.3f} vs stable {s.share:.3f} (|diff| {diff:.3f}, max "
                                          f"{settings.max_share_difference:.3f})", diff <= settings.max_share_difference))
    p = homogeneity_p(c.histogram, s.histogram)
    if p is not None:
        checks.append(("probability distribution vs stable", f"chi-squared p = {p:.2g} (alpha {settings.alpha:g})",
                       p >= settings.alpha))
    references = references or {}
    if references.get(c.version) and references.get(s.version):
        pc = goodness_of_fit_p(c.histogram, references[c.version]["probability_histogram"])
        ps = goodness_of_fit_p(s.histogram, references[s.version]["probability_histogram"])
        if pc is not None and ps is not None:
            # Live traffic may differ from the evaluation set for both: only drift of the canary alone counts.
            ok = pc >= settings.alpha or ps < settings.alpha
            checks.append(("probability distribution vs reference", f"canary p = {pc:.2g}, stable p = {ps:.2g} "
                                                                    f"(alpha {settings.alpha:g})", ok))
    if c.requests < settings.min_requests:
        status = "inconclusive"
        checks.append(("sample size", f"{c.requests:.0f} canary requests (min {settings.min_requests})", False))
    else:
        status = "healthy" if all(ok for _, _, ok in checks) else "worse"
    return Verdict(s, c, checks, status, settings.analysis_window)


def analyze(settings: RolloutSettings, stable_version: str, canary_version: str,
            references: dict | None = None) -> Verdict:
    prometheus = Prometheus(settings.prometheus_url)
    stable = measure(prometheus, stable_version, settings.analysis_window)
    canary = measure(prometheus, canary_version, settings.analysis_window)
    return judge(stable, canary, settings, references)
