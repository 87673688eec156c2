"""The durable send queue: each result object waits here, encrypted, until the PACS has it.

A result is written whole before it is queued: its DICOM file, encrypted with the field key (it repeats the patient
and study modules), in the image store under its study's prefix, then its row, in the same transaction that moves
the film to ``sending``. The results still being built when the first one is queued (the SR goes as soon as it is
made; the Secondary Capture and the PDF take longer) are reserved in that transaction as ``building`` rows, with
their SOP Instance UIDs and a build lease, renewed while they are built: they keep the film open, are queued when
built, and are built again by the scorer if the lease runs out first (the gateway stopped in between). A sender
claims due rows with a lease (a conditional update, so gateway replicas and a restarted gateway never send one row
at once), sends, and marks it sent; a failure that may pass is tried again with exponential back-off (jittered,
capped), across restarts, for as long as it takes. A resend after a crash carries the same SOP Instance UID, so the
PACS keeps one copy. A refusal for good (STOW-RS 409, a C-STORE failure status) is kept as ``failed`` with the
PACS's reason, counted, and never resent by itself. When every result of a film is stored, the encrypted original
modules and the encrypted files are deleted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Collection
from datetime import timedelta
from typing import Protocol

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.metrics import RECEIPT_TO_STORED, SENT, WAITING
from gateway.records import GatewayInstance, OutboxItem
from gateway.settings import GatewaySettings
from gateway.worker import run_passes
from webapp.db import transaction
from webapp.field_encryption import FieldCipher
from webapp.models import Study, utcnow
from webapp.storage import ImageStore

log = logging.getLogger(__name__)

#: Extra lease beyond the send deadline, so that a slow send is not claimed twice.
LEASE_MARGIN_S = 15.0
#: Results claimed per pass.
BATCH = 8


class SendFailed(Exception):
    """The PACS did not take the object now (unreachable, 5xx, out of resources): try again later."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SendRefused(Exception):
    """The PACS refused the object for good (STOW-RS 409, a C-STORE failure status)."""


class Sender(Protocol):
    def send(self, data: bytes, sop_instance_uid: str) -> None: ...


class Outbox:
    def __init__(self, settings: GatewaySettings, factory: sessionmaker[Session], store: ImageStore,
                 cipher: FieldCipher, sender: Sender | None):
        self.settings = settings
        self.factory = factory
        self.store = store
        self.cipher = cipher
        self.sender = sender
        self.wake = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the workers' loop, once it runs

    # -- queueing ------------------------------------------------------------------------------------
    def put(self, instance_id: int, prefix: str, objects: list[tuple[str, str, bytes]],
            later: list[tuple[str, str]] = ()) -> dict[str, int] | None:
        """Queue ``objects`` ((kind, SOP Instance UID, DICOM file)) for one film in state ``scoring``, and reserve
        ``later`` ((kind, SOP Instance UID): results still being built, queued with :meth:`complete`). Returns the
        reserved rows' ids by kind, or None when another worker queued the film's results first (this one's files
        are removed)."""
        keys = []
        try:
            for kind, sop_instance_uid, data in objects:
                key = f"{prefix}/outbox/{sop_instance_uid}.{kind}.enc"
                self.store.put(key, self.cipher.encrypt_bytes(data))
                keys.append(key)
            with transaction(self.factory) as db:
                moved = db.execute(update(GatewayInstance).where(GatewayInstance.id == instance_id,
                                                                 GatewayInstance.state == "scoring")
                                   .values(state="sending")).rowcount
                if moved != 1:
                    raise _Lost()
                now = utcnow()
                for (kind, sop_instance_uid, _), key in zip(objects, keys):
                    db.add(OutboxItem(instance_id=instance_id, kind=kind, sop_instance_uid=sop_instance_uid,
                                      blob_key=key, state="waiting", attempts=0, created_at=now,
                                      next_attempt_at=now - timedelta(seconds=1)))
                reserved = {kind: OutboxItem(instance_id=instance_id, kind=kind, sop_instance_uid=sop_instance_uid,
                                             blob_key=f"{prefix}/outbox/{sop_instance_uid}.{kind}.enc",
                                             state="building", attempts=0, created_at=now, next_attempt_at=None,
                                             lease_until=now + timedelta(seconds=self.settings.build_lease_s))
                            for kind, sop_instance_uid in later}
                db.add_all(reserved.values())
                db.flush()
                ids = {kind: row.id for kind, row in reserved.items()}
        except _Lost:
            self._remove(keys)
            return None
        except BaseException:
            self._remove(keys)
            raise
        return ids

    def complete(self, item_id: int, data: bytes) -> bool:
        """Queue the built object of a reserved (``building``) row; False when another scorer built it first (its
        lease ran out), and this copy is dropped. Each build writes its own file, so neither removes the other's."""
        with self.factory() as db:
            item = db.get(OutboxItem, item_id)
            if item is None or item.state != "building":
                return False
            key = f"{item.blob_key.removesuffix('.enc')}.{secrets.token_hex(4)}.enc"
        self.store.put(key, self.cipher.encrypt_bytes(data))
        try:
            with transaction(self.factory) as db:
                moved = db.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.state == "building")
                                   .values(state="waiting", blob_key=key, lease_until=None,
                                           next_attempt_at=utcnow() - timedelta(seconds=1))).rowcount
        except BaseException:
            self._remove([key])
            raise
        if moved != 1:
            self._remove([key])
            return False
        return True

    def claim_unbuilt(self, limit: int) -> list[tuple[int, int, str, str]]:
        """Reserved results whose build lease ran out (the gateway stopped while building them), claimed for a new
        build: (item id, study id, kind, SOP Instance UID)."""
        now = utcnow()
        free = or_(OutboxItem.lease_until.is_(None), OutboxItem.lease_until < now)
        claimed = []
        with transaction(self.factory) as db:
            due = db.execute(select(OutboxItem.id, GatewayInstance.study_id, OutboxItem.kind,
                                    OutboxItem.sop_instance_uid)
                             .join(GatewayInstance, GatewayInstance.id == OutboxItem.instance_id)
                             .where(OutboxItem.state == "building", free).order_by(OutboxItem.id).limit(limit)).all()
            for item_id, study_id, kind, sop_instance_uid in due:
                won = db.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.state == "building",
                                                          free)
                                 .values(lease_until=now + timedelta(seconds=self.settings.build_lease_s))).rowcount
                if won == 1:
                    claimed.append((item_id, study_id, kind, sop_instance_uid))
        return claimed

    def renew_build_leases(self, item_ids: Collection[int]) -> int:
        """Extend the build lease of those reserved rows still ``building`` (their builds still run), so that a slow
        build is not claimed by another scorer; rows completed or given up meanwhile are left alone. Returns how
        many were renewed."""
        if not item_ids:
            return 0
        with transaction(self.factory) as db:
            return db.execute(update(OutboxItem).where(OutboxItem.id.in_(item_ids), OutboxItem.state == "building")
                              .values(lease_until=utcnow() + timedelta(seconds=self.settings.build_lease_s))).rowcount

    def give_up_build(self, item_id: int, message: str) -> None:
        """A reserved result that cannot be built any more (its study is gone): kept as failed, with the reason."""
        with transaction(self.factory) as db:
            db.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.state == "building")
                       .values(state="failed", last_error=message[:1000], lease_until=None))

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete(key)  # best effort: ciphertext without a row is harmless

    # -- sending -------------------------------------------------------------------------------------
    def claim_due(self, limit: int) -> list[int]:
        now = utcnow()
        lease_until = now + timedelta(seconds=self.settings.send_timeout_s + LEASE_MARGIN_S)
        claimed = []
        with transaction(self.factory) as db:
            due = db.scalars(select(OutboxItem.id).where(
                OutboxItem.state == "waiting", OutboxItem.next_attempt_at <= now,
                or_(OutboxItem.lease_until.is_(None), OutboxItem.lease_until < now))
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id).limit(limit)).all()
            for item_id in due:
                won = db.execute(update(OutboxItem).where(
                    OutboxItem.id == item_id, OutboxItem.state == "waiting",
                    or_(OutboxItem.lease_until.is_(None), OutboxItem.lease_until < now))
                    .values(lease_until=lease_until)).rowcount
                if won == 1:
                    claimed.append(item_id)
        return claimed

    def send_one(self, item_id: int) -> str:
        """Send one claimed item; returns the outcome (stored, retry, refused)."""
        with self.factory() as db:
            item = db.get(OutboxItem, item_id)
            kind, sop_instance_uid, key = item.kind, item.sop_instance_uid, item.blob_key
        try:
            data = self.cipher.decrypt_bytes(self.store.get(key))
            self.sender.send(data, sop_instance_uid)
        except SendRefused as exc:
            log.error("result %d (%s): %s; kept as failed (an admin may retry it)", item_id, kind, exc)
            self._mark(item_id, state="failed", error=str(exc))
            SENT.labels(kind, "refused").inc()
            return "refused"
        except SendFailed as exc:
            when = self._retry_later(item_id, str(exc))
            log.warning("result %d (%s) not sent: %s; next try in %.0f s", item_id, kind, exc, when)
            SENT.labels(kind, "retry").inc()
            return "retry"
        except Exception as exc:  # a bug or an unreadable blob must not stop the queue: retry, loudly
            when = self._retry_later(item_id, f"{type(exc).__name__}: {str(exc)[:200]}")
            log.exception("result %d (%s) not sent; next try in %.0f s", item_id, kind, when)
            SENT.labels(kind, "retry").inc()
            return "retry"
        self._mark(item_id, state="sent", error=None)
        SENT.labels(kind, "stored").inc()
        self._finish_if_complete(item_id)
        return "stored"

    def _mark(self, item_id: int, state: str, error: str | None) -> None:
        with transaction(self.factory) as db:
            item = db.get(OutboxItem, item_id)
            item.state, item.last_error, item.lease_until = state, error, None
            item.attempts += 1
            item.next_attempt_at = None
            if state == "sent":
                item.sent_at = utcnow()

    def _retry_later(self, item_id: int, message: str) -> float:
        with transaction(self.factory) as db:
            item = db.get(OutboxItem, item_id)
            item.attempts += 1
            delay = min(self.settings.send_retry_max_s,
                        self.settings.send_retry_initial_s * 2 ** min(item.attempts - 1, 30))
            delay *= random.uniform(0.8, 1.2)
            item.next_attempt_at = utcnow() + timedelta(seconds=delay)
            item.lease_until, item.last_error = None, message[:1000]
        return delay

    def _finish_if_complete(self, item_id: int) -> None:
        """The film's last result is stored: forget the original (modules and encrypted files), record the time.
        One conditional UPDATE decides it, so of two results stored at once exactly one finishes the film."""
        with transaction(self.factory) as db:
            instance_id = db.scalar(select(OutboxItem.instance_id).where(OutboxItem.id == item_id))
            still_open = select(OutboxItem.id).where(OutboxItem.instance_id == instance_id,
                                                     OutboxItem.state != "sent").exists()
            finished = db.execute(update(GatewayInstance).where(
                GatewayInstance.id == instance_id, GatewayInstance.state == "sending", ~still_open)
                .values(state="done", finished_at=utcnow())).rowcount
            if finished != 1:
                return
            instance = db.get(GatewayInstance, instance_id)
            keys = list(db.scalars(select(OutboxItem.blob_key).where(OutboxItem.instance_id == instance_id)))
            if instance.study_id is not None:
                db.execute(update(Study).where(Study.id == instance.study_id).values(pacs_original=None))
            seconds = (instance.finished_at - instance.received_at).total_seconds()
        RECEIPT_TO_STORED.observe(seconds)
        self._remove(keys)
        log.info("film %d: every result stored in the PACS %.2f s after receipt", instance_id, seconds)

    def retry_failed(self) -> int:
        """Queue every refused result again (after an admin fixed the cause); returns how many. A result that
        could never be built (its study was deleted first) has no file to send, and stays failed."""
        with transaction(self.factory) as db:
            count = db.execute(update(OutboxItem).where(OutboxItem.state == "failed", OutboxItem.attempts > 0)
                               .values(state="waiting", next_attempt_at=utcnow(), lease_until=None)).rowcount
        if count:
            log.info("%d refused results queued again", count)
            self.wake_soon()
        return count

    def wake_soon(self) -> None:
        """Wake the sending worker from another thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.wake.set)

    def refresh_gauges(self) -> None:
        with self.factory() as db:
            counts = dict(db.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
            scoring = db.scalar(select(func.count()).select_from(GatewayInstance)
                                .where(GatewayInstance.state == "scoring"))
        WAITING.labels("to_score").set(scoring)
        WAITING.labels("to_send").set(counts.get("waiting", 0))
        WAITING.labels("refused").set(counts.get("failed", 0))

    async def run(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        await run_passes("outbox", self._full_pass, stop, self.wake, self.settings.worker_poll_s)

    async def _full_pass(self) -> bool:
        return await self.tick() == BATCH

    async def tick(self) -> int:
        claimed = await asyncio.to_thread(self.claim_due, BATCH) if self.sender is not None else []
        # At once: a film's three results (and other films') travel side by side, each on its own connection.
        await asyncio.gather(*(asyncio.to_thread(self.send_one, item_id) for item_id in claimed))
        await asyncio.to_thread(self.refresh_gauges)
        return len(claimed)


class _Lost(Exception):
    pass
