"""The gateway's durable state, in the web app's database (Alembic migration 0003): what it received, and the
results waiting to go back to the PACS. Nothing here identifies a patient: an instance is known by a keyed
fingerprint of its SOP Instance UID; a result waiting to be sent lies encrypted in the image store.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from webapp.models import Base, Study, UTCDateTime, utcnow

#: An instance's life: ignored (acknowledged, not scored), scoring (recorded, waiting for its result), sending
#: (its results wait in the outbox), done (every result stored in the PACS), rejected (the transformer refused
#: the image: nothing to send), recorded (scored, no PACS to send to).
INSTANCE_STATES = ("ignored", "scoring", "sending", "done", "rejected", "recorded")
#: A result: building (reserved while it is built, with a build lease in lease_until; the film stays open),
#: waiting (due at next_attempt_at), sent, failed (the PACS refused it for good, or it could not be built).
OUTBOX_STATES = ("building", "waiting", "sent", "failed")
RESULT_KINDS = ("sr", "sc", "pdf")


class GatewayInstance(Base):
    __tablename__ = "gateway_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC of the SOP Instance UID
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)  # why ignored or rejected
    calling_ae: Mapped[str] = mapped_column(String(16))  # or "DICOMWEB" for pull mode
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), nullable=True,
                                                 index=True)

    study: Mapped[Study | None] = relationship()


class OutboxItem(Base):
    __tablename__ = "gateway_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("gateway_instances.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # sr | sc | pdf
    # Made once, when the result is built: a resend after a crash carries the same UID, so the PACS keeps one copy.
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    blob_key: Mapped[str] = mapped_column(String(200))  # the encrypted object in the image store
    state: Mapped[str] = mapped_column(String(16), default="waiting", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    instance: Mapped[GatewayInstance] = relationship()
