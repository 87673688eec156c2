"""Studies: store an upload (file + row in one transaction), score it, retry it, query it, take feedback, export
the reviewed ones as labelled training data.

The order never loses an upload: the row and the file are written first (a file left by a failed
commit is removed; a row is never committed without its file), then the transformer is called. A
study the transformer cannot score now stays ``pending`` with a due time; :class:`RetryWorker` (one
per app process) claims due studies with a lease, so replicas and a restarted app share the work and
none is scored twice at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from webapp.db import transaction
from webapp.inference import InferenceClient, InferenceRejected, InferenceResult, InferenceUnavailable
from webapp.metrics import INFERENCE_SECONDS, PENDING, RETRIES
from webapp.models import FORMATS, LABELS, STATUSES, VERDICTS, Study, User, utcnow
from webapp.settings import WebSettings
from webapp.storage import ImageStore
from webapp.uploads import CheckedUpload

log = logging.getLogger(__name__)

MAX_NOTE = 2000
#: Extra lease beyond the inference deadline, so a slow answer is not claimed twice.
LEASE_MARGIN_S = 15.0


class StudyNotFound(LookupError):
    """No such study for this user (another user's study is 'not found' too, so ids cannot be probed)."""


class StudyConflict(ValueError):
    """The study is not in a state that allows this (feedback before a result, a heatmap while pending)."""


@dataclass
class StudyFilter:
    status: str | None = None
    label: str | None = None
    feedback: str | None = None  # confirmed | corrected | none
    date_from: date | None = None
    date_to: date | None = None
    q: str | None = None
    owner: str | None = None  # admins only
    page: int = 1
    per_page: int = 20


@dataclass
class Scoring:
    study: Study
    outcome: str  # scored | pending | rejected
    message: str = ""


def clean_note(note: str | None) -> str:
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise ValueError(f"the note is too long: {len(note)} characters, at most {MAX_NOTE}")
    return note


class StudyService:
    def __init__(self, settings: WebSettings, factory: sessionmaker[Session], store: ImageStore,
                 client: InferenceClient):
        self.settings = settings
        self.factory = factory
        self.store = store
        self.client = client
        self._cipher = None

    def cipher(self):
        """The field cipher (made on first use: most uploads carry no identifying field)."""
        if self._cipher is None:
            self._cipher = self.settings.field_cipher()
        return self._cipher

    # -- create + score ------------------------------------------------------------------------------
    async def create(self, owner: User, upload: CheckedUpload, note: str) -> Study:
        """Store the file and its row in one transaction; the new study is leased to the caller."""
        prefix = self.store.new_prefix()
        lease = self.settings.inline_wait_s + LEASE_MARGIN_S
        age_token = None if upload.patient_age_years is None else self.cipher().encrypt(upload.patient_age_years)

        def write() -> Study:
            with transaction(self.factory) as db:
                now = utcnow()
                study = Study(owner_id=owner.id, note=note, storage_prefix=prefix, image_format=upload.image_format,
                              image_sha256=upload.sha256, image_bytes=len(upload.data),
                              has_preview=upload.preview_png is not None, deidentified=upload.deidentified,
                              status="pending", created_at=now, next_attempt_at=now,
                              lease_until=now + timedelta(seconds=lease), patient_age_token=age_token)
                db.add(study)
                db.flush()
                self.store.put(study.image_key(), upload.data)
                if upload.preview_png is not None:
                    self.store.put(study.preview_key(), upload.preview_png)
                return study

        try:
            return await asyncio.to_thread(write)
        except BaseException:
            await asyncio.to_thread(self.store.delete_prefix, prefix)
            raise

    async def score(self, study_id: int, timeout_s: float, discard_rejected: bool = False,
                    data: bytes | None = None) -> Scoring:
        """Score a study the caller holds the lease of. A refused image is deleted (``discard_rejected``:
        the uploader is still waiting and gets the message) or kept as ``rejected`` (retry worker).
        ``data``: the stored file's bytes when the caller has them (the upload), else read from the store."""
        study = await asyncio.to_thread(self._load, study_id)
        if data is None:
            data = await asyncio.to_thread(self.store.get, study.image_key())
        age = self.cipher().decrypt(study.patient_age_token) if study.patient_age_token else None
        started = time.perf_counter()
        try:
            result = await self.client.infer(data, timeout_s, age)
        except InferenceRejected as exc:
            INFERENCE_SECONDS.labels("rejected").observe(time.perf_counter() - started)
            if discard_rejected:
                await asyncio.to_thread(self._delete, study)
            else:
                study = await asyncio.to_thread(self._mark_rejected, study_id, str(exc))
            return Scoring(study, "rejected", str(exc))
        except InferenceUnavailable as exc:
            INFERENCE_SECONDS.labels(exc.reason).observe(time.perf_counter() - started)
            study = await asyncio.to_thread(self._schedule_retry, study_id, str(exc))
            return Scoring(study, "pending", str(exc))
        INFERENCE_SECONDS.labels("ok").observe(result.seconds)
        study = await asyncio.to_thread(self._mark_done, study, result)
        return Scoring(study, "scored")

    def _load(self, study_id: int) -> Study:
        with self.factory() as db:
            study = db.get(Study, study_id)
            if study is None:
                raise StudyNotFound(study_id)
            return study

    def _delete(self, study: Study) -> None:
        with transaction(self.factory) as db:
            row = db.get(Study, study.id)
            if row is not None:
                db.delete(row)
        self.store.delete_prefix(study.storage_prefix)

    def _mark_rejected(self, study_id: int, message: str) -> Study:
        with transaction(self.factory) as db:
            study = db.get(Study, study_id)
            study.status, study.rejection = "rejected", message
            study.attempts += 1
            study.lease_until = study.next_attempt_at = None
            return study

    def _schedule_retry(self, study_id: int, message: str) -> Study:
        with transaction(self.factory) as db:
            study = db.get(Study, study_id)
            study.attempts += 1
            delay = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** (study.attempts - 1))
            study.next_attempt_at = utcnow() + timedelta(seconds=delay * random.uniform(0.8, 1.2))
            study.lease_until, study.last_error = None, message[:1000]
            return study

    def _mark_done(self, study: Study, result: InferenceResult) -> Study:
        if result.heatmap_png is not None:
            self.store.put(study.heatmap_key(), result.heatmap_png)
        with transaction(self.factory) as db:
            row = db.get(Study, study.id)
            row.status = "done"
            row.probability, row.label, row.threshold = result.probability, result.label, result.threshold
            row.model_name, row.model_version = result.model_name, result.model_version
            row.quality_flags = result.quality_flags
            row.decision, row.ood_score, row.in_intended_use = result.decision, result.ood_score, result.in_intended_use
            row.refer_reasons, row.model_intended_use = result.refer_reasons, result.intended_use or None
            row.has_heatmap = result.heatmap_png is not None
            row.scored_at, row.inference_ms = utcnow(), round(result.seconds * 1000, 1)
            row.attempts += 1
            row.lease_until = row.next_attempt_at = None
            row.last_error = None
            return row

    # -- the retry worker's side -----------------------------------------------------------------------
    def claim_due(self, limit: int) -> list[int]:
        now = utcnow()
        lease_until = now + timedelta(seconds=self.settings.inference_timeout_s + LEASE_MARGIN_S)
        claimed = []
        with transaction(self.factory) as db:
            due = db.scalars(select(Study.id).where(Study.status == "pending", Study.next_attempt_at <= now,
                                                    or_(Study.lease_until.is_(None), Study.lease_until < now))
                             .order_by(Study.next_attempt_at).limit(limit)).all()
            for study_id in due:
                # Conditional update: of two replicas racing for a study, exactly one sees rowcount 1.
                result = db.execute(update(Study).where(
                    Study.id == study_id, Study.status == "pending",
                    or_(Study.lease_until.is_(None), Study.lease_until < now)).values(lease_until=lease_until))
                if result.rowcount == 1:
                    claimed.append(study_id)
        return claimed

    def count_pending(self) -> int:
        with self.factory() as db:
            return db.scalar(select(func.count()).select_from(Study).where(Study.status == "pending"))

    # -- queries ---------------------------------------------------------------------------------------
    def get(self, db: Session, user: User, study_id: int) -> Study:
        study = db.get(Study, study_id)
        if study is None or not (user.is_admin or study.owner_id == user.id):
            raise StudyNotFound(study_id)
        return study

    def search(self, db: Session, user: User, f: StudyFilter) -> tuple[list[Study], int]:
        query = select(Study)
        if not user.is_admin:
            query = query.where(Study.owner_id == user.id)
        elif f.owner:
            query = query.join(User, Study.owner_id == User.id).where(User.username == f.owner)
        if f.status:
            query = query.where(Study.status == f.status)
        if f.label:
            query = query.where(Study.label == f.label)
        if f.feedback == "none":
            query = query.where(Study.feedback.is_(None))
        elif f.feedback:
            query = query.where(Study.feedback == f.feedback)
        if f.date_from:
            query = query.where(Study.created_at >= datetime.combine(f.date_from, datetime.min.time(), timezone.utc))
        if f.date_to:
            query = query.where(Study.created_at < datetime.combine(f.date_to + timedelta(days=1),
                                                                    datetime.min.time(), timezone.utc))
        if f.q:
            query = query.where(func.lower(Study.note).contains(f.q.lower(), autoescape=True))
        total = db.scalar(select(func.count()).select_from(query.subquery()))
        rows = db.scalars(query.order_by(Study.created_at.desc(), Study.id.desc())
                          .offset((f.page - 1) * f.per_page).limit(f.per_page)).all()
        return list(rows), total

    def give_feedback(self, db: Session, user: User, study_id: int, verdict: str, label: str | None,
                      note: str | None) -> Study:
        study = self.get(db, user, study_id)
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if study.status != "done":
            raise StudyConflict(f"study {study_id} has no result yet (status: {study.status}); feedback needs one")
        if verdict == "confirmed":
            if label not in (None, "", study.label):
                raise ValueError(f"a confirmation keeps the model's label {study.label}; send 'corrected' to "
                                 f"change it")
            label = study.label
        elif label not in LABELS:
            raise ValueError(f"a correction needs the right label: one of {', '.join(LABELS)}")
        elif label == study.label:
            raise ValueError(f"{label} is the model's own label; send 'confirmed' to agree with it")
        study.feedback, study.feedback_label = verdict, label
        study.feedback_at, study.feedback_by_id = utcnow(), user.id
        if note is not None:
            study.note = clean_note(note)
        return study


class RetryWorker:
    """Scores due pending studies with back-off until they succeed; runs inside the app's event loop."""

    def __init__(self, service: StudyService):
        self.service = service
        self.settings = service.settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="study-retry-worker")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.settings.inference_timeout_s + 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception:  # the database may be briefly away: log and go on
                log.exception("retry worker: a pass failed; trying again")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.worker_poll_s)
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> int:
        claimed = await asyncio.to_thread(self.service.claim_due, self.settings.worker_concurrency)
        if claimed:
            results = await asyncio.gather(*(self._score(i) for i in claimed), return_exceptions=True)
            for study_id, result in zip(claimed, results):
                if isinstance(result, BaseException):
                    log.error("retry worker: study %d failed: %s", study_id, result)
        PENDING.set(await asyncio.to_thread(self.service.count_pending))
        return len(claimed)

    async def _score(self, study_id: int) -> None:
        scoring = await self.service.score(study_id, self.settings.inference_timeout_s)
        RETRIES.labels(scoring.outcome).inc()
        if scoring.outcome == "pending":
            log.info("study %d still pending after %d attempts (%s); next try at %s", study_id,
                     scoring.study.attempts, scoring.message, scoring.study.next_attempt_at.isoformat())
        else:
            log.info("study %d %s after %d attempts", study_id, scoring.outcome, scoring.study.attempts)


EXPORT_MANIFEST = "pneumoscope-export.json"


def export_reviewed(factory: sessionmaker[Session], store: ImageStore, out: Path, only_corrected: bool = False
                    ) -> dict:
    """Write every scored study a doctor confirmed or corrected as labelled training data: its file, as stored,
    under ``out/train/<the doctor's label>/`` (the Kaggle layout the training ingest reads), and
    ``out/pneumoscope-export.json`` (study, review, the model's label and version, digest per file).
    Returns ``{"out", "exported", "NORMAL", "PNEUMONIA"}``."""
    with factory() as db:
        query = select(Study).where(Study.status == "done", Study.feedback.is_not(None)).order_by(Study.id)
        if only_corrected:
            query = query.where(Study.feedback == "corrected")
        studies = list(db.scalars(query))
    manifest = []
    for study in studies:
        folder = out / "train" / study.feedback_label
        folder.mkdir(parents=True, exist_ok=True)
        name = f"pneumoscope-study-{study.id}.{FORMATS[study.image_format][0]}"
        (folder / name).write_bytes(store.get(study.image_key()))
        manifest.append({"file": f"train/{study.feedback_label}/{name}", "study": study.id,
                         "label": study.feedback_label, "review": study.feedback, "model_label": study.label,
                         "model_version": study.model_version, "sha256": study.image_sha256})
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_MANIFEST).write_text(json.dumps({"studies": manifest}, indent=1))
    counts = {label: sum(1 for m in manifest if m["label"] == label) for label in LABELS}
    return {"out": str(out), "exported": len(manifest), **counts}


def study_json(study: Study, owner_name: str | None = None) -> dict:
    base = f"/api/studies/{study.id}"
    result = None
    if study.status == "done":
        result = {"probability": study.probability, "label": study.label, "threshold": study.threshold,
                  "decision": study.decision, "ood_score": study.ood_score, "in_intended_use": study.in_intended_use,
                  "refer_reasons": study.refer_reasons or [], "model_name": study.model_name,
                  "model_version": study.model_version, "model_intended_use": study.model_intended_use,
                  "quality_flags": study.quality_flags, "scored_at": _iso(study.scored_at),
                  "inference_ms": study.inference_ms}
    feedback = None
    if study.feedback:
        feedback = {"verdict": study.feedback, "label": study.feedback_label, "at": _iso(study.feedback_at)}
    out = {"id": study.id, "status": study.status, "created_at": _iso(study.created_at), "note": study.note,
           "image_format": study.image_format, "deidentified": study.deidentified, "result": result,
           "rejection": study.rejection, "attempts": study.attempts, "feedback": feedback,
           "links": {"self": base, "image": f"{base}/image", "heatmap": f"{base}/heatmap" if study.has_heatmap
                     else None, "report": f"{base}/report", "page": f"/studies/{study.id}"}}
    if study.status == "pending":
        out["next_attempt_at"] = _iso(study.next_attempt_at)
    if owner_name is not None:
        out["owner"] = owner_name
    return out


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if moment else None


__all__ = ["STATUSES", "StudyService", "RetryWorker", "StudyFilter", "StudyNotFound", "StudyConflict", "study_json"]
