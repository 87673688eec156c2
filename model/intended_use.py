"""What a model version is for, and the decision every answer names: PNEUMONIA, NORMAL or REFER, and why.

The bundle's ``intended_use`` (written at export, hashed with the bundle) says who the model was trained on, the
age limit, the training profile (a demonstration model says so), the held-out figures it was registered with,
the refer band and the out-of-distribution detector (:mod:`model.ood`). :class:`DecisionRule` turns one film's
calibrated probability, out-of-distribution score and patient age into the answer's decision fields. The
predictor computes them, because it holds the version (docs/design.md, "Every answer is one version's").

REFER, with one reason per cause (code + a sentence a clinician can read):

- ``uncertain``: the probability lies in the refer band fitted on val (``model.metrics.choose_abstention_band``);
- ``out_of_distribution``: ``ood_score`` above 1 (the film is unlike the training films);
- ``age_over_limit``: the patient's age (DICOM Patient's Age, 0010,1010, or the request's ``patient_age``) is above
  the version's limit;
- ``intended_use_unknown``: the version was exported before the detector existed, so nothing can vouch for it;
- ``view_not_frontal``: the film's DICOM header names a lateral, decubitus or oblique view (View Position,
  0018,5101, or the coded view of View Code Sequence: ``model.dicom.header_view``). Every version reads upright
  frontal films (PA or AP), so the transformer says it (:func:`view_reason`), whatever version answered. Without
  either (a JPEG, a header that names no view) nothing is claimed: no image check tells a lateral film from a
  frontal one, and the detector is the safety net.

``in_intended_use`` is false for all but ``uncertain``; ``label`` (PNEUMONIA/NORMAL at the threshold) never changes.

numpy-free and torch-free: the transformer parses ages with it, the predictor decides with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

DECISIONS = ("PNEUMONIA", "NORMAL", "REFER")
REFER = "REFER"
#: The profiles that make demonstration models (a few minutes of CPU), marked so in the bundle.
DEMONSTRATION_PROFILES = frozenset({"smoke", "demo"})
DEFAULT_AGE_LIMIT_YEARS = 18.0
#: The training data's population (../shared/data/README.md): what a bundle trained on it declares.
DEFAULT_POPULATION = "children aged 1 to 5 years"
DEFAULT_SOURCE = ("Guangzhou Women and Children's Medical Center pediatric chest radiographs (Kermany et al., "
                  "Cell 2018)")
DEFAULT_VIEWS = "frontal chest radiographs (PA or AP)"
#: The oldest age accepted as a patient's age (anything above is a typo, refused with a clear message).
MAX_AGE_YEARS = 150.0

_AGE_STRING = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DAYS_PER_YEAR = 365.25
_UNIT_YEARS = {"D": 1 / _DAYS_PER_YEAR, "W": 7 / _DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}


class InvalidAge(ValueError):
    """A patient age that is neither a number of years nor a DICOM age string (``045Y``, ``030M``)."""


def parse_age(value) -> float | None:
    """Years from a DICOM Age String (``nnnD|W|M|Y``) or a number of years; None for empty. Raises InvalidAge."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise InvalidAge("a patient age must be a number of years or a DICOM age string (nnnD, nnnW, nnnM or nnnY)")
    if isinstance(value, (int, float)):
        years = float(value)
    else:
        text = str(value)
        match = _AGE_STRING.match(text)
        if match:
            years = int(match.group(1)) * _UNIT_YEARS[match.group(2).upper()]
        else:
            try:
                years = float(text)
            except ValueError:  # the value itself is not repeated: messages are logged, and logs carry no PHI
                raise InvalidAge("the patient age is neither a number of years nor a DICOM age string (nnnD, nnnW, "
                                 "nnnM or nnnY: days, weeks, months or years)") from None
    if not (math.isfinite(years) and 0.0 <= years <= MAX_AGE_YEARS):
        raise InvalidAge(f"a patient age must lie between 0 and {MAX_AGE_YEARS:g} years")
    return years


@dataclass(frozen=True)
class Reason:
    code: str
    text: str


#: View Position (0018,5101) of an upright frontal chest film.
FRONTAL_VIEWS = frozenset({"PA", "AP"})
#: The standard's defined terms for the other views of a chest film (PS3.3 C.8.11.5.1.1: lateral, lateral
#: decubitus, oblique), and the spelled-out words some modalities write instead.
NON_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LLO", "RLO", "LAT", "LATERAL", "DECUBITUS", "OBLIQUE"})


def view_position(value) -> str:
    """A View Position as written by any modality (``"ll "``, None) -> its code (``"LL"``, ``""``), at most the
    16 characters of a DICOM code string."""
    return " ".join(str(value or "").split()).upper()[:16]


def view_reason(value) -> Reason | None:
    """The ``view_not_frontal`` reason when the view ``value`` (a View Position term, as ``model.dicom.header_view``
    reads it) names a view no version reads; None for PA, AP, an empty value, or one that is not a known term (then
    nothing is claimed)."""
    view = view_position(value)
    if view in FRONTAL_VIEWS or view not in NON_FRONTAL_VIEWS:
        return None
    return Reason("view_not_frontal", f"The film's DICOM header gives its view as {view}: the model "
                  "reads upright frontal chest films (PA or AP) only, so its result is not reliable here. Read the "
                  "frontal film of the study.")


@dataclass(frozen=True)
class Verdict:
    decision: str  # PNEUMONIA | NORMAL | REFER
    in_intended_use: bool
    refer_reasons: tuple[Reason, ...] = ()

    def reasons_json(self) -> list[dict]:
        return [asdict(r) for r in self.refer_reasons]


@dataclass(frozen=True)
class DecisionRule:
    """One version's decision: its threshold, refer band, age limit and whether it carries a detector."""

    threshold: float
    band_low: float
    band_high: float
    age_limit_years: float = DEFAULT_AGE_LIMIT_YEARS
    has_detector: bool = True
    population: str = DEFAULT_POPULATION
    summary: dict = field(default_factory=dict)  # what the answers carry about the version (profile, figures)

    def __post_init__(self):
        if not self.band_low <= self.threshold <= self.band_high:
            raise ValueError(f"the refer band [{self.band_low}, {self.band_high}) must contain the threshold "
                             f"{self.threshold}")

    @classmethod
    def from_meta(cls, meta: dict) -> "DecisionRule":
        """The rule of a bundle's ``pneumoscope.json``. A bundle without a refer band refers nothing as
        uncertain; one without ``intended_use`` keeps the default age limit and has no detector."""
        threshold = float(meta["threshold"])
        band = meta.get("refer_band") or {}
        use = meta.get("intended_use") or {}
        return cls(threshold, float(band.get("low", threshold)), float(band.get("high", threshold)),
                   float(use.get("age_limit_years", DEFAULT_AGE_LIMIT_YEARS)), bool(use.get("ood")),
                   str(use.get("population", DEFAULT_POPULATION)), answer_summary(meta))

    def decide(self, probability: float, ood_score: float | None, age_years: float | None) -> Verdict:
        reasons = []
        outside = False
        if ood_score is None or not math.isfinite(ood_score):
            if not self.has_detector:
                outside = True
                reasons.append(Reason("intended_use_unknown", "This model version was exported without an "
                                      "out-of-distribution check, so nothing tells whether the film lies within "
                                      "its intended use. Re-export the model, or read the film without it."))
            else:  # a detector that gave no score (a non-finite feature): refuse to vouch for the film
                outside = True
                reasons.append(Reason("out_of_distribution", "The out-of-distribution check could not score this "
                                      "film, so the model's result is not reliable here."))
        elif ood_score > 1.0:
            outside = True
            reasons.append(Reason("out_of_distribution", f"This film is unlike the films the model was trained on "
                                  f"({self.population}; out-of-distribution score {ood_score:.2f}, limit 1.00): "
                                  "for example an adult, another view, another kind of machine, or a poor film. "
                                  "The model's result is not reliable here."))
        if age_years is not None and age_years > self.age_limit_years:
            outside = True
            reasons.append(Reason("age_over_limit", f"The patient is older than this model's intended use allows "
                                  f"({self.age_limit_years:g} years): it was trained on {self.population}."))
        if self.band_low <= probability < self.band_high:
            reasons.append(Reason("uncertain", f"The probability of pneumonia ({probability:.1%}) lies in this "
                                  f"model's indeterminate band ({self.band_low:.1%} to {self.band_high:.1%}), where "
                                  "its decisions on validation films were not reliable enough."))
        if reasons:
            return Verdict(REFER, not outside, tuple(reasons))
        return Verdict("PNEUMONIA" if probability >= self.band_high else "NORMAL", True)


def answer_summary(meta: dict) -> dict:
    """The facts every answer carries about the version that made it: profile, demonstration or not, the
    population, the age limit and the held-out figures it was registered with (a few hundred bytes)."""
    use = meta.get("intended_use") or {}
    training = meta.get("training") or {}
    profile = use.get("profile", training.get("profile"))
    summary = {"profile": profile,
               "demonstration": bool(use.get("demonstration", profile in DEMONSTRATION_PROFILES)),
               "population": use.get("population", DEFAULT_POPULATION),
               "views": use.get("views", DEFAULT_VIEWS),
               "age_limit_years": float(use.get("age_limit_years", DEFAULT_AGE_LIMIT_YEARS)),
               "out_of_distribution_check": bool(use.get("ood"))}
    if use.get("registered"):
        summary["registered"] = _finite(use["registered"])
    return summary


def _finite(value):
    """JSON for any client: no NaN (a figure undefined on one class becomes null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
