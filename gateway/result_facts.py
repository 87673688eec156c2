"""The facts every result object states, in one place: what the transformer answered for one film.

Today's answer carries ``probability``, ``label``, ``threshold``, ``model_version`` and ``quality_flags``; the
intended-use contract (docs/design.md, "Contracts between parts") adds ``decision`` (PNEUMONIA | NORMAL | REFER),
the reasons for a REFER, ``ood_score`` and ``in_intended_use``. Those are used when present and never required.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

DECISIONS = ("PNEUMONIA", "NORMAL", "REFER")
#: Above the result objects' series: marked on each of them, burned into the Secondary Capture.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass
class ResultFacts:
    probability: float
    label: str
    threshold: float
    model_name: str
    model_version: str
    scored_at: datetime
    quality_flags: list[str] = field(default_factory=list)
    decision: str | None = None
    refer_reasons: list[str] = field(default_factory=list)
    ood_score: float | None = None
    in_intended_use: bool | None = None
    model_sha256: str | None = None

    @property
    def finding(self) -> str:
        """PNEUMONIA, NORMAL or REFER: the decision when the answer names one, else the label."""
        return self.decision if self.decision in DECISIONS else self.label

    def headline(self) -> str:
        return {"PNEUMONIA": "Pneumonia suspected", "NORMAL": "No pneumonia detected",
                "REFER": "Refer: no automated decision"}.get(self.finding, "No result")


def flag_names(flags) -> list[str]:
    """The transformer's quality flags (a list of names, or a dict of booleans) as a list of names."""
    if isinstance(flags, dict):
        return [str(name) for name, value in flags.items() if value]
    if isinstance(flags, (list, tuple)):
        return [str(name) for name in flags]
    return []


def facts_from(study, extra: dict | None = None) -> ResultFacts:
    """The facts of a scored study row, with the answer's fields the row has no column for (``extra``)."""
    # The row keeps the decision fields (migration 0002): they outlive a restart, when ``extra`` is gone.
    row = {"decision": study.decision, "ood_score": study.ood_score, "in_intended_use": study.in_intended_use,
           "refer_reasons": [f"{r['code']}: {r['text']}" if r.get("text") else r.get("code", "")
                             for r in study.refer_reasons or [] if isinstance(r, dict)] or None}
    extra = {**(extra or {}), **{k: v for k, v in row.items() if v is not None}}
    reasons = extra.get("refer_reasons") or []
    if isinstance(reasons, str):
        reasons = [reasons]
    ood = extra.get("ood_score")
    in_use = extra.get("in_intended_use")
    return ResultFacts(
        probability=float(study.probability), label=str(study.label), threshold=float(study.threshold),
        model_name=study.model_name or "pneumonia", model_version=study.model_version or "unknown",
        scored_at=study.scored_at, quality_flags=flag_names(study.quality_flags),
        decision=str(extra["decision"]) if extra.get("decision") in DECISIONS else None,
        refer_reasons=[str(r) for r in reasons], ood_score=float(ood) if isinstance(ood, (int, float)) else None,
        in_intended_use=in_use if isinstance(in_use, bool) else None,
        model_sha256=str(extra["model_sha256"]) if extra.get("model_sha256") else None)
