"""Score the films the gateway recorded, then build their results and queue them for the PACS.

Scoring is the web app's (``webapp.studies.StudyService.score``: the transformer's Open Inference Protocol v2 REST
endpoint, the heatmap, the study row updated, a retry with back-off while the transformer is away). This worker
claims the gateway's due studies with the same lease the web app's retry worker uses, so replicas and restarts
share them. A scored film's results (SR, Secondary Capture, PDF) are built from the study row, the answer's extra
fields and the encrypted original modules, and queued in the outbox in one step; a film the transformer refuses
(not a chest X-ray) is kept as ``rejected``, and its original modules are forgotten. A film found scored but
without results (the gateway stopped in between) gets them on the next pass.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import highdicom as hd
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway import originals
from gateway.metrics import SCORED
from gateway.outbox import Outbox
from gateway.pdf_writer import build_encapsulated_pdf
from gateway.records import RESULT_KINDS, GatewayInstance
from gateway.result_facts import facts_from
from gateway.secondary_capture_writer import build_secondary_capture
from gateway.settings import GatewaySettings
from gateway.sr_writer import build_sr
from gateway.worker import run_passes
from webapp.db import transaction
from webapp.field_encryption import FieldCipher
from webapp.models import Study, utcnow
from webapp.report import study_pdf
from webapp.storage import ImageStore
from webapp.studies import LEASE_MARGIN_S, StudyService

log = logging.getLogger(__name__)

BATCH = 4


class Scorer:
    def __init__(self, settings: GatewaySettings, factory: sessionmaker[Session], store: ImageStore,
                 cipher: FieldCipher, studies: StudyService, outbox: Outbox, send: bool):
        self.settings = settings
        self.factory = factory
        self.store = store
        self.cipher = cipher
        self.studies = studies
        self.outbox = outbox
        self.send = send  # False: no PACS to send to; results are recorded in the web app only
        self.device_uid = _device_uid(settings.ae_title)
        self.wake = asyncio.Event()
        self._builders = ThreadPoolExecutor(len(RESULT_KINDS), thread_name_prefix="gateway-build")

    # -- claiming ------------------------------------------------------------------------------------
    def claim_due(self, limit: int) -> list[int]:
        now = utcnow()
        lease_until = now + timedelta(seconds=self.studies.settings.inference_timeout_s + LEASE_MARGIN_S)
        free = or_(Study.lease_until.is_(None), Study.lease_until < now)
        claimed = []
        with transaction(self.factory) as db:
            due = db.scalars(select(Study.id).join(GatewayInstance, GatewayInstance.study_id == Study.id).where(
                GatewayInstance.state == "scoring", Study.status == "pending", Study.next_attempt_at <= now, free)
                .order_by(Study.next_attempt_at).limit(limit)).all()
            for study_id in due:
                won = db.execute(update(Study).where(Study.id == study_id, Study.status == "pending", free)
                                 .values(lease_until=lease_until)).rowcount
                if won == 1:
                    claimed.append(study_id)
        return claimed

    def stranded(self) -> list[tuple[int, str]]:
        """(study id, status) of films still 'scoring' whose study is scored or rejected already."""
        with self.factory() as db:
            return list(db.execute(select(Study.id, Study.status).join(
                GatewayInstance, GatewayInstance.study_id == Study.id).where(
                GatewayInstance.state == "scoring", Study.status.in_(("done", "rejected")))).all())

    # -- work ----------------------------------------------------------------------------------------
    async def tick(self) -> int:
        claimed = await asyncio.to_thread(self.claim_due, BATCH)
        for study_id in claimed:
            scoring = await self.studies.score(study_id, self.studies.settings.inference_timeout_s)
            SCORED.labels(scoring.outcome if scoring.outcome != "pending" else "retry").inc()
            if scoring.outcome == "pending":
                log.info("study %d: not scored yet (%s); next try at %s", study_id, scoring.message,
                         scoring.study.next_attempt_at.isoformat())
            elif scoring.outcome == "rejected":
                await asyncio.to_thread(self.reject, study_id, scoring.message)
            elif await asyncio.to_thread(self.build_results, study_id,
                                         scoring.result.extra if scoring.result else {}):
                self.outbox.wake.set()
        for study_id, status in await asyncio.to_thread(self.stranded):
            if status == "done":
                if await asyncio.to_thread(self.build_results, study_id, {}):
                    self.outbox.wake.set()
            else:
                await asyncio.to_thread(self.reject, study_id, "the transformer refused the image")
        return len(claimed)

    def reject(self, study_id: int, message: str) -> None:
        with transaction(self.factory) as db:
            moved = db.execute(update(GatewayInstance).where(GatewayInstance.study_id == study_id,
                                                             GatewayInstance.state == "scoring")
                               .values(state="rejected", reason=message[:200], finished_at=utcnow())).rowcount
            db.execute(update(Study).where(Study.id == study_id).values(pacs_original=None))
        if moved:
            log.warning("study %d: the transformer refused the film (%s); nothing is sent back", study_id, message)

    def build_results(self, study_id: int, extra: dict) -> bool:
        """Build and queue the film's results; True when queued here (False: nothing to do, or another did it)."""
        with self.factory() as db:
            study = db.get(Study, study_id)
            instance = db.scalar(select(GatewayInstance).where(GatewayInstance.study_id == study_id))
        if instance is None or instance.state != "scoring" or study.status != "done":
            return False
        if not self.send:
            with transaction(self.factory) as db:
                db.execute(update(GatewayInstance).where(GatewayInstance.id == instance.id,
                                                         GatewayInstance.state == "scoring")
                           .values(state="recorded", finished_at=utcnow()))
                db.execute(update(Study).where(Study.id == study_id).values(pacs_original=None))
            log.info("study %d scored; no PACS to send results to (set --send-to)", study_id)
            return False
        original = originals.restore(self.cipher.decrypt(study.pacs_original))
        facts = facts_from(study, extra)
        heatmap = self.store.get(study.heatmap_key()) if study.has_heatmap else None
        identity = self.cipher.decrypt(study.identity) if study.identity else {}
        manufacturer = self.settings.manufacturer
        sr_uid, sc_uid, pdf_uid = hd.UID(), hd.UID(), hd.UID()
        builds = {"sr": (sr_uid, lambda: build_sr(original, facts, hd.UID(), sr_uid, manufacturer, self.device_uid)),
                  "pdf": (pdf_uid, lambda: build_encapsulated_pdf(original, facts,
                                                                  study_pdf(study, self.store, identity),
                                                                  hd.UID(), pdf_uid, manufacturer))}
        if heatmap is not None:
            builds["sc"] = (sc_uid, lambda: build_secondary_capture(original, facts, heatmap, hd.UID(), sc_uid,
                                                                    manufacturer))
        # Side by side: the image work (Pillow, the PDF's JPEGs) runs outside the GIL while the SR is built.
        futures = {kind: self._builders.submit(build) for kind, (_, build) in builds.items()}
        objects = [(kind, builds[kind][0], futures[kind].result()) for kind in RESULT_KINDS if kind in builds]
        if not self.outbox.put(instance.id, study.storage_prefix, objects):
            return False
        log.info("study %d: %s queued for the PACS", study_id, ", ".join(kind for kind, _, _ in objects))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        await run_passes("scorer", self._full_pass, stop, self.wake, self.settings.worker_poll_s)

    async def _full_pass(self) -> bool:
        return await self.tick() == BATCH


def _device_uid(ae_title: str) -> str:
    """A stable UID naming this gateway as the SR's observer device (derived from its AE title)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["pneumoscope-gateway", ae_title])
