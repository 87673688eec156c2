"""The doctor's report on a study, in versions: a draft is written (impression, patient block), then signed; a
signed version is read-only for good, and a correction is a new version that names the one it corrects and why.

At sign-off the version keeps what was signed: the patient block (encrypted, as on the study) and the AI
finding (decision, probability, threshold, model, reasons). The study's identifying fields may be edited only
while its newest report is a draft (or before there is one), so the patient block and the signed report never
disagree without a new version saying so.

Signing and correcting write their audit line (``signed``, ``corrected``) in the same transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from webapp import audit
from webapp.models import ReportVersion, Study, User, utcnow
from webapp.studies import StudyConflict

MAX_IMPRESSION = 8000
MAX_REASON = 1000


def versions(db: Session, study: Study) -> list[ReportVersion]:
    return list(db.scalars(select(ReportVersion).where(ReportVersion.study_id == study.id)
                           .order_by(ReportVersion.version)))


def latest(db: Session, study: Study) -> ReportVersion | None:
    return db.scalar(select(ReportVersion).where(ReportVersion.study_id == study.id)
                     .order_by(ReportVersion.version.desc()).limit(1))


def latest_of(db: Session, study_ids: list[int]) -> dict[int, ReportVersion]:
    """The newest version of each study's report (one query for a worklist page)."""
    if not study_ids:
        return {}
    out: dict[int, ReportVersion] = {}
    for row in db.scalars(select(ReportVersion).where(ReportVersion.study_id.in_(study_ids))
                          .order_by(ReportVersion.study_id, ReportVersion.version)):
        out[row.study_id] = row  # ordered by version: the last one wins
    return out


def identity_editable(db: Session, study: Study) -> bool:
    current = latest(db, study)
    return current is None or current.state == "draft"


def _clean(text: str | None, limit: int, what: str) -> str:
    text = (text or "").strip()
    if len(text) > limit:
        raise ValueError(f"the {what} is too long: {len(text)} characters, at most {limit}")
    return text


def save_draft(db: Session, user: User, study: Study, impression: str | None) -> ReportVersion:
    """Create the first version or update the current draft. A signed report is not changed: 409."""
    if study.status != "done":
        raise StudyConflict(f"study {study.id} has no result yet (status: {study.status}); a report needs one")
    impression = _clean(impression, MAX_IMPRESSION, "impression")
    current = latest(db, study)
    if current is not None and current.state == "signed":
        raise StudyConflict(f"version {current.version} of the report is signed and read-only; start a correction "
                            "to write a new version")
    now = utcnow()
    if current is None:
        current = ReportVersion(study_id=study.id, version=1, state="draft", impression=impression, created_at=now,
                                created_by_id=user.id, updated_at=now)
        db.add(current)
    else:
        current.impression, current.updated_at = impression, now
    db.flush()
    return current


def finding_of(study: Study) -> dict:
    """The AI finding as it stands, for a signed version to keep."""
    return {"decision": study.shown_decision(), "label": study.label, "probability": study.probability,
            "threshold": study.threshold, "model_name": study.model_name, "model_version": study.model_version,
            "refer_reasons": study.refer_reasons or [], "in_intended_use": study.in_intended_use,
            "quality_flags": study.quality_flags, "cam_lung_share": study.cam_lung_share}


def sign(db: Session, user: User, study: Study, client: str = "") -> ReportVersion:
    """Sign the current draft: who and when, the patient block and the AI finding frozen with it. ``client``:
    the signer's address, for the audit log."""
    current = latest(db, study)
    if current is None:
        raise StudyConflict(f"study {study.id} has no report to sign; write the impression first")
    if current.state == "signed":
        raise StudyConflict(f"version {current.version} of the report is already signed")
    if not current.impression:
        raise ValueError("write the impression before signing the report")
    current.state, current.signed_at, current.signed_by_id = "signed", utcnow(), user.id
    current.patient, current.finding = study.identity, finding_of(study)
    audit.record(db, "signed", user, study.id, client, f"report v{current.version}")
    db.flush()
    return current


def correct(db: Session, user: User, study: Study, reason: str | None, client: str = "") -> ReportVersion:
    """A new draft version correcting the signed one, starting from its impression (the reason is not in the
    audit line: it is the doctor's free text)."""
    reason = _clean(reason, MAX_REASON, "reason for the correction")
    if not reason:
        raise ValueError("say why the signed report is corrected")
    current = latest(db, study)
    if current is None or current.state != "signed":
        raise StudyConflict("only a signed report is corrected; edit the draft instead")
    now = utcnow()
    draft = ReportVersion(study_id=study.id, version=current.version + 1, state="draft",
                          impression=current.impression, corrects=current.version, correction_reason=reason,
                          created_at=now, created_by_id=user.id, updated_at=now)
    db.add(draft)
    audit.record(db, "corrected", user, study.id, client, f"report v{draft.version} corrects v{current.version}")
    db.flush()
    return draft


def version_json(version: ReportVersion, patient: dict | None = None) -> dict:
    from webapp.studies import _iso

    out = {"version": version.version, "state": version.state, "impression": version.impression,
           "corrects": version.corrects, "correction_reason": version.correction_reason,
           "created_at": _iso(version.created_at), "updated_at": _iso(version.updated_at),
           "signed_at": _iso(version.signed_at),
           "signed_by": version.signed_by.username if version.signed_by is not None else None,
           "finding": version.finding}
    if patient is not None:
        out["patient"] = patient
    return out
