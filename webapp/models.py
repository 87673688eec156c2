"""The database tables (SQLAlchemy 2 declarative). Alembic migrations in ``webapp/migrations`` create them.

Studies hold no PHI in the clear beyond what the doctor types (the note, the impression): no file name, no DICOM
header fields. The identifying fields (patient reference, accession number, view, clinical question) are one
Fernet token (``Study.identity``, ``ReportVersion.patient``; :mod:`webapp.field_encryption`).
A study received from a PACS keeps the original's patient and study modules encrypted until its results are sent.
The patient's age read from a DICOM header before de-identification (the model's intended use has an age
limit, and a retry needs it) is a Fernet token too (``Study.patient_age_token``).
Secrets are stored hashed: passwords with argon2, API and session tokens with SHA-256 (they are
random 256-bit values, so a fast hash is enough).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, TypeDecorator,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from model import intended_use

STATUSES = ("pending", "done", "rejected")
#: Where a study came from: uploaded in the web app, or received from a PACS by the DICOM gateway.
SOURCES = ("upload", "PACS")
LABELS = ("NORMAL", "PNEUMONIA")
#: A served answer's decision: the label, or REFER (in the indeterminate band fitted on val, or outside the
#: intended use: a reader must decide without the model).
DECISIONS = ("PNEUMONIA", "NORMAL", "REFER")
#: The views a doctor sets by hand: the upright frontal films the model reads, PA first as the forms list them.
FRONTAL_VIEW_CHOICES = tuple(sorted(intended_use.FRONTAL_VIEWS, reverse=True))
#: Every view a study may carry: a frontal one, or a non-frontal term of View Position (0018,5101) kept from an
#: uploaded DICOM's header, so that a film referred as not frontal names the view it was taken in. Stored inside
#: the identity token (``Study.identity``), so a longer term needs no migration.
VIEWS = (*FRONTAL_VIEW_CHOICES, *sorted(intended_use.NON_FRONTAL_VIEWS))
REPORT_STATES = ("draft", "signed")
VERDICTS = ("confirmed", "corrected")
#: File extension and media type of each stored format.
FORMATS = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png"), "dicom": ("dcm", "application/dicom")}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite drops the zone; PostgreSQL keeps it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime stored; use aware UTC datetimes")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(100), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    user: Mapped[User] = relationship()


class WebSession(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    user: Mapped[User] = relationship()


class LoginAttempt(Base):
    """Failed sign-ins, for the rate limits (kept in the database so that replicas share them)."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    note: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16), default="upload", server_default="upload", index=True)
    # What a result sent back to the PACS must repeat from the original (patient and study modules, UIDs), as a
    # Fernet token (webapp.field_encryption); kept only until every result is sent, then cleared.
    pacs_original: Mapped[str | None] = mapped_column(Text, nullable=True)

    # the stored (de-identified) file
    storage_prefix: Mapped[str] = mapped_column(String(64), unique=True)
    image_format: Mapped[str] = mapped_column(String(8))  # jpeg | png | dicom
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_bytes: Mapped[int] = mapped_column(Integer)
    has_preview: Mapped[bool] = mapped_column(Boolean, default=False)  # a PNG rendering (DICOM)
    deidentified: Mapped[bool] = mapped_column(Boolean, default=False)

    # the result
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    label: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    quality_flags: Mapped[dict | list | None] = mapped_column(JSON, nullable=True)
    has_heatmap: Mapped[bool] = mapped_column(Boolean, default=False)
    scored_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    inference_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    rejection: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the served answer's uncertainty and provenance (migration 0002; absent from older model servers)
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)  # DECISIONS
    refer_reasons: Mapped[list | None] = mapped_column(JSON, nullable=True)  # [{"code", "text"}]
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    in_intended_use: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    model_info: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # profile, demonstration, held-out figures
    # the class-activation map as the model returned it ({"rows", "cols", "values"}: ReLU'd, scaled to [0, 1]),
    # drawn by the viewer at the film's resolution, and the share of its mass inside the lungs
    cam: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    lung_mask: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the served lung mask, same form
    cam_lung_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    lung_share_source: Mapped[str | None] = mapped_column(String(32), nullable=True)  # lung model | lung prior
    # the identifying fields, one Fernet token of {"patient_ref", "accession", "view", "clinical_question"}
    identity: Mapped[str | None] = mapped_column(Text, nullable=True)
    # a DICOM film's 16-bit display copy (display16.gz): width, height, window centre/width in its units, ...
    display: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # DICOM Patient's Age in years, read before de-identification: a Fernet token (field_encryption), never logged
    # (migration 0005)
    patient_age_token: Mapped[str | None] = mapped_column(Text, nullable=True)

    # the retry worker's bookkeeping
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    # the doctor's feedback
    feedback: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)  # confirmed | corrected
    feedback_label: Mapped[str | None] = mapped_column(String(16), nullable=True)
    feedback_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    feedback_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)

    owner: Mapped[User] = relationship(foreign_keys=[owner_id])

    def image_key(self) -> str:
        return f"{self.storage_prefix}/image.{FORMATS[self.image_format][0]}"

    def preview_key(self) -> str:
        return f"{self.storage_prefix}/preview.png"

    def heatmap_key(self) -> str:
        return f"{self.storage_prefix}/heatmap.png"

    def shown_key(self) -> str:
        """The file a browser or a PDF shows: the PNG rendering of a DICOM film, else the stored image."""
        return self.preview_key() if self.has_preview else self.image_key()

    def thumbnail_key(self) -> str:
        return f"{self.storage_prefix}/thumbnail.png"

    def display16_key(self) -> str:
        return f"{self.storage_prefix}/display16.gz"

    def shown_decision(self) -> str | None:
        """The served decision, or the label of an answer from a model server that sends no decision."""
        return self.decision or self.label


class ReportVersion(Base):
    """One version of a study's report. A draft is edited; once signed it never changes: a correction is a new
    version (``corrects``) with its reason. What was signed is kept with it (the patient block, encrypted, and
    the AI finding), so a later change to the study cannot alter a signed report."""

    __tablename__ = "report_versions"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="draft")  # REPORT_STATES
    impression: Mapped[str] = mapped_column(Text, default="")
    corrects: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the signed version this one corrects
    correction_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    signed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    patient: Mapped[str | None] = mapped_column(Text, nullable=True)  # Fernet token, frozen at sign-off
    finding: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the AI finding, frozen at sign-off

    signed_by: Mapped[User | None] = relationship(foreign_keys=[signed_by_id])
    created_by: Mapped[User] = relationship(foreign_keys=[created_by_id])


class AuditEvent(Base):
    """One line of the audit log: who did what to which study, when. Append-only: rows are inserted by
    :func:`webapp.audit.record` and never changed; the ORM refuses an update or a delete
    (``webapp.audit``), and the database's triggers refuse them too (migration 0004)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # The name is kept beside the id: the line stays readable whatever happens to the account later.
    actor_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), index=True)
    # No foreign key: a refused upload's row is deleted, its audit lines stay.
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    client: Mapped[str] = mapped_column(String(64), default="")
    # What, in a few words the app writes itself (never a note, a file name or a header field: no PHI).
    detail: Mapped[str] = mapped_column(String(200), default="")
