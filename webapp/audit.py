"""The audit log: who signed in, viewed, exported, confirmed, corrected, signed or sent which study, and when.

Append-only, three times over: this module only ever inserts (there is no update or delete path), the ORM
refuses to flush a changed or deleted :class:`AuditEvent` or to run an UPDATE/DELETE statement on its table,
and the database's triggers (migration 0004) refuse UPDATE, DELETE (and TRUNCATE on PostgreSQL) from any
client. An event is written in the same transaction as the change it records, so a change is never
committed without its line. Admins read it on ``/admin/audit``, from ``/api/audit`` and with
``pneumoscope audit``. Lines hold ids, names and actions only: never a note, a file name or a DICOM field.

Reads are recorded too (``viewed``: the study page, its JSON, its image, heatmap or report page, and what the
viewer reads: CAM, overlay, 16-bit pixels, report versions), once per user, study and kind of read within
:data:`VIEW_REPEAT_S`: a page that polls a pending study or loads its image and heatmap writes one line per
minute, not one per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from webapp.models import AuditEvent, User, utcnow

#: Every action the log knows, with what it means (the admin page and the CLI show this text).
ACTIONS = {
    "signed_in": "signed in",
    "sign_in_failed": "failed to sign in (wrong password or unknown user)",
    "sign_in_refused": "was refused a sign-in (too many failures)",
    "signed_out": "signed out",
    "uploaded": "uploaded a study",
    "viewed": "viewed a study (page, result, image, heatmap or report)",
    "exported": "exported a study (report PDF, training export)",
    "confirmed": "confirmed the model's finding",
    "corrected": "corrected the model's finding, or started a correction of a signed report",
    "signed": "signed a study's report",
    "sent": "sent a study's result to another system (PACS)",
    "user_added": "created an account",
    "password_changed": "changed an account's password",
    "token_issued": "issued an API token",
    "token_revoked": "revoked API tokens",
    "audit_read": "read the audit log",
}
#: A repeated read of the same study by the same user is recorded once per this many seconds.
VIEW_REPEAT_S = 60.0
#: Who did it when no user did: the command line (an operator at the console).
CONSOLE = "console"


class AuditLogIsAppendOnly(RuntimeError):
    """An attempt to change or delete an audit line."""


def record(db: Session, action: str, actor: User | str | None, study_id: int | None = None, client: str = "",
           detail: str = "") -> AuditEvent:
    """Add one line to ``db``'s transaction (the caller commits it with the change it records)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    name = actor.username if isinstance(actor, User) else (actor or CONSOLE)
    line = AuditEvent(at=utcnow(), actor_id=actor.id if isinstance(actor, User) else None, actor=name[:64],
                      action=action, study_id=study_id, client=(client or "")[:64], detail=detail[:200])
    db.add(line)
    return line


def record_view(db: Session, actor: User, study_id: int, what: str, client: str = "") -> bool:
    """Record that ``actor`` read ``what`` of a study, unless the same read was recorded within VIEW_REPEAT_S.
    Commits. Returns whether a line was written."""
    since = utcnow() - timedelta(seconds=VIEW_REPEAT_S)
    repeated = db.scalar(select(AuditEvent.id).where(
        AuditEvent.actor_id == actor.id, AuditEvent.study_id == study_id, AuditEvent.action == "viewed",
        AuditEvent.detail == what, AuditEvent.at > since).limit(1))
    if repeated is None:
        record(db, "viewed", actor, study_id, client, what)
    db.commit()
    return repeated is None


@dataclass
class AuditFilter:
    actor: str | None = None
    study_id: int | None = None
    action: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    page: int = 1
    per_page: int = 50


def search(db: Session, f: AuditFilter) -> tuple[list[AuditEvent], int]:
    """Lines matching ``f``, newest first, and how many match in all."""
    query = select(AuditEvent)
    if f.actor:
        query = query.where(AuditEvent.actor == f.actor)
    if f.study_id is not None:
        query = query.where(AuditEvent.study_id == f.study_id)
    if f.action:
        query = query.where(AuditEvent.action == f.action)
    if f.date_from:
        query = query.where(AuditEvent.at >= datetime.combine(f.date_from, datetime.min.time(), timezone.utc))
    if f.date_to:
        query = query.where(AuditEvent.at < datetime.combine(f.date_to + timedelta(days=1), datetime.min.time(),
                                                             timezone.utc))
    total = db.scalar(select(func.count()).select_from(query.subquery()))
    rows = db.scalars(query.order_by(AuditEvent.id.desc()).offset((f.page - 1) * f.per_page).limit(f.per_page))
    return list(rows), total


def as_dict(line: AuditEvent) -> dict:
    return {"id": line.id, "at": line.at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "actor": line.actor, "action": line.action, "study_id": line.study_id, "client": line.client,
            "detail": line.detail}


# -- the ORM's side of append-only -----------------------------------------------------------------------

@event.listens_for(Session, "before_flush")
def _refuse_changed_lines(session: Session, _context, _instances) -> None:
    for line in session.deleted:
        if isinstance(line, AuditEvent):
            raise AuditLogIsAppendOnly("the audit log is append-only: a line cannot be deleted")
    for line in session.dirty:
        if isinstance(line, AuditEvent) and session.is_modified(line):
            raise AuditLogIsAppendOnly("the audit log is append-only: a line cannot be changed")


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_changes(state) -> None:
    if (state.is_update or state.is_delete) and any(m.class_ is AuditEvent for m in state.all_mappers):
        raise AuditLogIsAppendOnly("the audit log is append-only: UPDATE and DELETE are refused")
