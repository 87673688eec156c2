"""Score the films the gateway recorded, then build their results and queue them for the PACS.

Scoring is the web app's (``webapp.studies.StudyService.score``: the transformer's Open Inference Protocol v2 REST
endpoint, the heatmap, the study row updated, a retry with back-off while the transformer is away). This worker
claims the gateway's due studies with the same lease the web app's retry worker uses, so replicas and restarts
share them. A scored film's results (SR, Secondary Capture, PDF) are built from the study row, the answer's extra
fields and the encrypted original modules. The SR is queued in the outbox as soon as it is built, with the other
two reserved in the same step (so the film stays open until they are sent too); they are built meanwhile, their
build leases renewed while they run, and queued when done. A film the transformer refuses (not a chest X-ray) is
kept as ``rejected``, and its original modules are forgotten. A film found scored but without results, or with a
reserved result never built (the gateway stopped in between), gets them on a later pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta

import highdicom as hd
from pydicom.dataset import Dataset
from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway import originals
from gateway.metrics import SCORED
from gateway.outbox import Outbox
from gateway.pdf_writer import REPORT_IMAGE_SIDE, build_encapsulated_pdf
from gateway.records import RESULT_KINDS, GatewayInstance
from gateway.result_facts import ResultFacts, facts_from
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


@dataclass
class _Inputs:
    """What a film's results are built from."""

    study: Study
    original: Dataset  # the kept patient and study modules
    facts: ResultFacts
    heatmap: bytes | None
    identity: dict


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
        if self.send and await asyncio.to_thread(self.rebuild_unbuilt):
            self.outbox.wake.set()
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
        """Build and queue the film's results; True when queued here (False: nothing to do, or another did it).

        The SR is queued (and the outbox woken) as soon as it is built, with the Secondary Capture and the PDF
        reserved beside it; those two are built meanwhile, side by side, and queued when done."""
        started = time.perf_counter()
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
        inputs = self._inputs(study, extra)
        uids = {kind: hd.UID() for kind in RESULT_KINDS}
        later = [kind for kind in ("sc", "pdf") if kind != "sc" or inputs.heatmap is not None]
        # The image work (Pillow, the PDF's JPEGs) runs outside the GIL while the SR is built and queued.
        futures = {kind: self._builders.submit(self._build, kind, inputs, uids[kind]) for kind in later}
        sr = self._build("sr", inputs, uids["sr"])
        built_sr = time.perf_counter()
        reserved = self.outbox.put(instance.id, study.storage_prefix, [("sr", uids["sr"], sr)],
                                   [(kind, uids[kind]) for kind in later])
        if reserved is None:
            return False
        self.outbox.wake_soon()
        queued_sr = time.perf_counter()
        self._queue_when_built({futures[kind]: (reserved[kind], study_id, kind) for kind in later})
        log.info("study %d: %s queued for the PACS", study_id, ", ".join(["sr", *later]))
        log.debug("study %d: SR built in %.0f ms and queued in %.0f ms; all queued after %.0f ms", study_id,
                  (built_sr - started) * 1000, (queued_sr - built_sr) * 1000, (time.perf_counter() - started) * 1000)
        return True

    def rebuild_unbuilt(self) -> int:
        """Build the reserved results whose build lease ran out (the gateway stopped while building them), with
        the SOP Instance UIDs they were given; returns how many were queued."""
        builds = {}
        for item_id, study_id, kind, sop_instance_uid in self.outbox.claim_unbuilt(BATCH):
            with self.factory() as db:
                study = db.get(Study, study_id) if study_id is not None else None
            if study is None or study.pacs_original is None or study.status != "done":
                log.error("result %d (%s): its study is gone; it cannot be built", item_id, kind)
                self.outbox.give_up_build(item_id, "the study was deleted before this result was built")
                continue
            inputs = self._inputs(study, {})
            if kind == "sc" and inputs.heatmap is None:
                self.outbox.give_up_build(item_id, "the study has no heatmap")
                continue
            builds[self._builders.submit(self._build, kind, inputs, sop_instance_uid)] = (item_id, study_id, kind)
        queued = self._queue_when_built(builds)
        for study_id, kind in queued:
            log.info("study %d: %s built again and queued for the PACS", study_id, kind)
        return len(queued)

    def _queue_when_built(self, builds: dict[Future, tuple[int, int, str]]) -> list[tuple[int, str]]:
        """Queue each reserved result ((item id, study id, kind) by its build) as its build ends; returns (study id,
        kind) of those queued here. While builds run, their leases are renewed every third of the lease, so that
        another scorer takes over the builds of a gateway that stopped, never a slow build that still runs."""
        queued = []
        running = set(builds)
        while running:
            ended, running = wait(running, timeout=self.settings.build_lease_s / 3, return_when=FIRST_COMPLETED)
            for build in ended:
                item_id, study_id, kind = builds[build]
                try:
                    data = build.result()
                except Exception:
                    log.exception("study %d: the %s could not be built; it is built again in %.0f s", study_id, kind,
                                  self.settings.build_lease_s)
                    continue
                if self.outbox.complete(item_id, data):
                    self.outbox.wake_soon()
                    queued.append((study_id, kind))
            try:
                self.outbox.renew_build_leases([builds[build][0] for build in running])
            except SQLAlchemyError as exc:
                # the database is out of reach for a moment: the builds go on and are queued when it is back; if a
                # lease runs out meanwhile, another scorer may build one too, and ``complete`` keeps one copy
                log.warning("the build leases could not be renewed (%s); the builds go on", type(exc).__name__)
        return queued

    def _inputs(self, study: Study, extra: dict) -> "_Inputs":
        return _Inputs(study=study, original=originals.restore(self.cipher.decrypt(study.pacs_original)),
                       facts=facts_from(study, extra),
                       heatmap=self.store.get(study.heatmap_key()) if study.has_heatmap else None,
                       identity=self.cipher.decrypt(study.identity) if study.identity else {})

    def _build(self, kind: str, inputs: "_Inputs", sop_instance_uid: str) -> bytes:
        manufacturer = self.settings.manufacturer
        if kind != "sr" and self.settings.test_build_delay_s:
            time.sleep(self.settings.test_build_delay_s)
        if kind == "sr":
            return build_sr(inputs.original, inputs.facts, hd.UID(), sop_instance_uid, manufacturer, self.device_uid)
        if kind == "sc":
            return build_secondary_capture(inputs.original, inputs.facts, inputs.heatmap, hd.UID(), sop_instance_uid,
                                           manufacturer)
        pdf = study_pdf(inputs.study, self.store, inputs.identity, max_side=REPORT_IMAGE_SIDE)
        return build_encapsulated_pdf(inputs.original, inputs.facts, pdf, hd.UID(), sop_instance_uid, manufacturer)

    async def run(self, stop: asyncio.Event) -> None:
        await run_passes("scorer", self._full_pass, stop, self.wake, self.settings.worker_poll_s)

    async def _full_pass(self) -> bool:
        return await self.tick() == BATCH


def _device_uid(ae_title: str) -> str:
    """A stable UID naming this gateway as the SR's observer device (derived from its AE title)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["pneumoscope-gateway", ae_title])
