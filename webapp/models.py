"""The database tables (SQLAlchemy 2 declarative). Alembic migrations in ``webapp/migrations`` create them.

Studies hold no PHI beyond what the doctor types (the note): no file name, no DICOM header fields. The one
header field kept, the patient's age (the model's intended use has an age limit, and a retry needs it after
de-identification removed it from the file), is stored as a Fernet token (``webapp.field_encryption``).
Secrets are stored hashed: passwords with argon2, API and session tokens with SHA-256 (they are
random 256-bit values, so a fast hash is enough).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATUSES = ("pending", "done", "rejected")
LABELS = ("NORMAL", "PNEUMONIA")
DECISIONS = ("PNEUMONIA", "NORMAL", "REFER")
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
    # the decision of the version that answered (model.intended_use): PNEUMONIA | NORMAL | REFER, and why
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    in_intended_use: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    refer_reasons: Mapped[list | None] = mapped_column(JSON, nullable=True)  # [{"code", "text"}]
    model_intended_use: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # profile, demonstration, figures
    # DICOM Patient's Age in years, read before de-identification: a Fernet token (field_encryption), never logged
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
