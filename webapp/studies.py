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

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from model.intended_use import view_position
from webapp import audit
from webapp.db import session_scope, transaction
from webapp.inference import InferenceClient, InferenceRejected, InferenceResult, InferenceUnavailable
from webapp.metrics import DUPLICATE_RESULTS, INFERENCE_SECONDS, PENDING, RETRIES
from webapp import heatmap
from webapp.models import FORMATS, LABELS, STATUSES, VERDICTS, VIEWS, Study, User, utcnow
from webapp.settings import WebSettings
from webapp.storage import ImageStore, StorageError
from webapp.uploads import CheckedUpload

log = logging.getLogger(__name__)

MAX_NOTE = 2000
#: The identifying fields a study may carry and their longest values (DICOM's LO is 64 characters).
IDENTITY_FIELDS = {"patient_ref": 64, "accession": 64, "view": max(map(len, VIEWS)), "clinical_question": 500}
#: What the API says of the view field (the upload's form field and the patient block's).
VIEW_DESCRIPTION = ("PA or AP; a lateral, decubitus or oblique view as a DICOM header's View Position names it "
                    "(LL, RLD, LATERAL, ...: the film is then referred as not frontal); empty: unknown")
SORTS = ("time", "suspicion")
#: The largest id an INTEGER column holds on PostgreSQL (SQLite's holds more): larger ids name no study.
MAX_ID = 2**31 - 1
#: The deepest page a listing serves (the offset must stay a database integer; nobody pages this far).
MAX_PAGE = 100_000
#: Extra lease beyond the inference deadline, so a slow answer is not claimed twice.
LEASE_MARGIN_S = 15.0


class StudyNotFound(LookupError):
    """No such study for this user (another user's study is 'not found' too, so ids cannot be probed)."""


class CommitOutcomeUnknown(Exception):
    """The database failed while committing: the transaction may or may not have been applied."""

    def __init__(self, error: DBAPIError):
        super().__init__(str(error))
        self.error = error


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
    sort: str = "time"  # time | suspicion
    decision: str | None = None  # PNEUMONIA | NORMAL | REFER


@dataclass
class Scoring:
    study: Study
    outcome: str  # scored | pending | rejected
    message: str = ""
    result: InferenceResult | None = None  # the transformer's answer, when scored (fields the row has no column for)


def clean_identity(values: dict | None) -> dict:
    """The identifying fields, stripped and checked; empty ones are left out. Raises ValueError with the reason."""
    out = {}
    for key, value in (values or {}).items():
        if key not in IDENTITY_FIELDS:
            raise ValueError(f"unknown patient field {key!r}; the fields are {', '.join(IDENTITY_FIELDS)}")
        value = " ".join(str(value or "").split())
        if key == "view":
            value = view_position(value)
            if value and value not in VIEWS:
                raise ValueError(f"view must be one of {', '.join(VIEWS)} (or empty), not {value!r}")
        if len(value) > IDENTITY_FIELDS[key]:
            raise ValueError(f"the {key.replace('_', ' ')} is too long: at most {IDENTITY_FIELDS[key]} characters")
        if value:
            out[key] = value
    return out


def clean_note(note: str | None) -> str:
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise ValueError(f"the note is too long: {len(note)} characters, at most {MAX_NOTE}")
    return note


class StudyService:
    def __init__(self, settings: WebSettings, factory: sessionmaker[Session], store: ImageStore,
                 client: InferenceClient, cipher=None):
        self.settings = settings
        self.factory = factory
        self.store = store
        self.client = client
        self._cipher = cipher

    @property
    def cipher(self):
        """The field cipher (webapp.field_encryption), made from the settings when first needed."""
        if self._cipher is None:
            self._cipher = self.settings.field_cipher()
        return self._cipher

    # -- identity (encrypted at rest; never logged) -----------------------------------------------------
    def identity_of(self, study: Study) -> dict:
        if not study.identity:
            return {}
        return self.cipher.decrypt(study.identity) or {}

    def set_identity(self, study: Study, identity: dict) -> None:
        identity = clean_identity(identity)
        study.identity = self.cipher.encrypt(identity) if identity else None

    # -- create + score ------------------------------------------------------------------------------
    async def create(self, owner: User, upload: CheckedUpload, note: str, identity: dict | None = None,
                     client: str = "") -> Study:
        """Store the file and its row in one transaction; the new study is leased to the caller. ``identity``:
        what the doctor typed, over what the DICOM header said (both stored encrypted).

        Files first, then the commit: a failure before the commit removes the files. A commit whose outcome
        is unknown (the database went away while committing) is looked up before anything is removed: the
        row may be there, and then the study is stored whole. When the database cannot even answer that, the
        files stay and :meth:`sweep_orphans` removes them later if no row ever names them."""
        prefix = self.store.new_prefix()
        lease = self.settings.inline_wait_s + LEASE_MARGIN_S
        written: list[Study] = []
        # a header's value longer than the field is cut, not refused: the file itself is fine
        from_header = {k: str(v)[:IDENTITY_FIELDS[k]] for k, v in upload.identity.items() if k in IDENTITY_FIELDS}
        merged = {**clean_identity(from_header), **clean_identity(identity)}
        age_token = None if upload.patient_age_years is None else self.cipher.encrypt(upload.patient_age_years)

        def write() -> Study:
            with session_scope(self.factory) as db:
                now = utcnow()
                study = Study(owner_id=owner.id, note=note, storage_prefix=prefix, image_format=upload.image_format,
                              image_sha256=upload.sha256, image_bytes=len(upload.data),
                              has_preview=upload.preview_png is not None, deidentified=upload.deidentified,
                              status="pending", created_at=now, next_attempt_at=now,
                              lease_until=now + timedelta(seconds=lease), display=upload.display_meta,
                              patient_age_token=age_token)
                self.set_identity(study, merged)
                db.add(study)
                db.flush()
                audit.record(db, "uploaded", owner, study.id, client, upload.image_format)
                self.store.put(study.image_key(), upload.data)
                if upload.preview_png is not None:
                    self.store.put(study.preview_key(), upload.preview_png)
                if upload.thumbnail_png is not None:
                    self.store.put(study.thumbnail_key(), upload.thumbnail_png)
                if upload.display16_gz is not None:
                    self.store.put(study.display16_key(), upload.display16_gz)
                written.append(study)
                try:
                    db.commit()
                except DBAPIError as exc:
                    raise CommitOutcomeUnknown(exc) from exc
                return study

        try:
            return await asyncio.to_thread(write)
        except CommitOutcomeUnknown as unknown:
            committed = await asyncio.to_thread(self._prefix_committed, prefix)
            if committed:
                log.warning("study %d: the commit reported an error but the row is there; stored whole",
                            written[0].id)
                return written[0]
            if committed is False:
                await asyncio.to_thread(self.store.delete_prefix, prefix)
            raise unknown.error from None
        except BaseException:
            await asyncio.to_thread(self.store.delete_prefix, prefix)
            raise

    def _prefix_committed(self, prefix: str, attempts: int = 3) -> bool | None:
        """Whether a row names ``prefix``: True, False, or None when the database does not answer."""
        for attempt in range(attempts):
            try:
                with session_scope(self.factory) as db:
                    return db.scalar(select(Study.id).where(Study.storage_prefix == prefix)) is not None
            except DBAPIError:
                time.sleep(0.5 * 2 ** attempt)
        return None

    def sweep_orphans(self, min_age_s: float) -> list[str]:
        """Remove stored files that no study row names, once they are ``min_age_s`` old (an upload that died
        between its files and its commit, a commit of unknown outcome). Returns the prefixes removed."""
        cutoff = time.time() - min_age_s
        old = {prefix for prefix, modified in self.store.prefixes() if modified < cutoff}
        if not old:
            return []
        with session_scope(self.factory) as db:
            named = set()
            ordered = sorted(old)
            for start in range(0, len(ordered), 500):
                chunk = ordered[start:start + 500]
                named.update(db.scalars(select(Study.storage_prefix).where(Study.storage_prefix.in_(chunk))))
        orphans = sorted(old - named)
        for prefix in orphans:
            self.store.delete_prefix(prefix)
        if orphans:
            log.warning("removed %d stored upload%s that no study names (uploads that failed before their "
                        "commit)", len(orphans), "s" if len(orphans) != 1 else "")
        return orphans

    async def score(self, study_id: int, timeout_s: float, discard_rejected: bool = False,
                    data: bytes | None = None) -> Scoring:
        """Score a study the caller holds the lease of. A refused image is deleted (``discard_rejected``:
        the uploader is still waiting and gets the message) or kept as ``rejected`` (retry worker).
        ``data``: the stored file's bytes when the caller has them (the upload), else read from the store."""
        study = await asyncio.to_thread(self._load, study_id)
        if data is None:
            data = await asyncio.to_thread(self.store.get, study.image_key())
        age = self.cipher.decrypt(study.patient_age_token) if study.patient_age_token else None
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
        return Scoring(study, "scored", result=result)

    def record_result(self, study_id: int, result: InferenceResult) -> Study:
        """Store a result for a study (what scoring does once the transformer has answered)."""
        return self._mark_done(self._load(study_id), result)

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
        with session_scope(self.factory) as db:  # scored meanwhile: its heatmap must not be overwritten either
            current = db.get(Study, study.id)
            if current.status != "pending":
                return self._drop_duplicate(current)
        if result.heatmap_png is not None:
            self.store.put(study.heatmap_key(), result.heatmap_png)
        with transaction(self.factory) as db:
            row = db.get(Study, study.id)
            if row.status != "pending":  # another process scored it while this answer was on its way
                return self._drop_duplicate(row)
            row.status = "done"
            row.probability, row.label, row.threshold = result.probability, result.label, result.threshold
            row.model_name, row.model_version = result.model_name, result.model_version
            row.quality_flags = result.quality_flags
            row.has_heatmap = result.heatmap_png is not None
            row.decision, row.refer_reasons = result.decision, result.refer_reasons
            row.ood_score, row.in_intended_use, row.model_info = result.ood_score, result.in_intended_use, \
                result.model_info
            row.cam, row.lung_mask = result.cam, result.lung_mask
            row.cam_lung_share, row.lung_share_source = _lung_share(result)
            row.scored_at, row.inference_ms = utcnow(), round(result.seconds * 1000, 1)
            row.attempts += 1
            row.lease_until = row.next_attempt_at = None
            row.last_error = None
            return row

    @staticmethod
    def _drop_duplicate(row: Study) -> Study:
        DUPLICATE_RESULTS.inc()
        log.warning("study %d already had a result (%s); this one is dropped", row.id, row.status)
        return row

    # -- the retry worker's side -----------------------------------------------------------------------
    def claim_due(self, limit: int) -> list[int]:
        now = utcnow()
        lease_until = now + timedelta(seconds=self.settings.inference_timeout_s + LEASE_MARGIN_S)
        claimed = []
        with transaction(self.factory) as db:
            # Studies from a PACS are the DICOM gateway's: it scores them and sends their results back.
            due = db.scalars(select(Study.id).where(Study.status == "pending", Study.next_attempt_at <= now,
                                                    Study.source != "PACS",
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
        if not 0 < study_id <= MAX_ID:  # no such row, and the databases refuse such an integer (a 500 before)
            raise StudyNotFound(study_id)
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
        if f.decision:
            query = query.where(func.coalesce(Study.decision, Study.label) == f.decision)
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
        order = (Study.created_at.desc(), Study.id.desc())
        if f.sort == "suspicion":
            order = (suspicion_rank(), Study.probability.desc().nulls_last(), *order)
        rows = db.scalars(query.order_by(*order).offset((f.page - 1) * f.per_page).limit(f.per_page)).all()
        return list(rows), total

    def give_feedback(self, db: Session, user: User, study_id: int, verdict: str, label: str | None,
                      note: str | None) -> Study:
        study = self.get(db, user, study_id)
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if study.status != "done":
            raise StudyConflict(f"study {study_id} has no result yet (status: {study.status}); feedback needs one")
        if study.shown_decision() == "REFER":
            # The model gave no finding, so there is nothing to confirm: the review is the doctor's reading, stored
            # as agreeing ("confirmed") or not ("corrected") with the label under the referral.
            if verdict == "confirmed" or label not in LABELS:
                raise ValueError("the model referred this film and gave no finding: send your reading as "
                                 f"'corrected' with the label, one of {', '.join(LABELS)}")
            verdict = "confirmed" if label == study.label else "corrected"
        elif verdict == "confirmed":
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


def suspicion_rank():
    """The worklist's triage order: REFER and PNEUMONIA first, then NORMAL, then studies waiting for a result,
    then those the service refused (each group by probability, highest first, then newest first)."""
    decision = func.coalesce(Study.decision, Study.label)
    return case(((Study.status == "done") & decision.in_(("REFER", "PNEUMONIA")), 0), (Study.status == "done", 1),
                (Study.status == "pending", 2), else_=3)


def _lung_share(result: InferenceResult) -> tuple[float | None, str | None]:
    """The model server's CAM lung share when it sends one, else the lung-field prior's (None without a CAM)."""
    if result.cam_lung_share is not None:
        return result.cam_lung_share, heatmap.SOURCE_MODEL
    if result.lung_mask is not None and result.cam is not None:
        return heatmap.lung_share(result.cam, result.lung_mask), heatmap.SOURCE_MODEL
    if result.cam is not None:
        return heatmap.lung_share(result.cam, heatmap.lung_prior_grid()), heatmap.SOURCE_PRIOR
    return None, None


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
        swept_at = time.monotonic()
        while not self._stop.is_set():
            try:
                await self.tick()
                if time.monotonic() - swept_at >= self.settings.orphan_sweep_s:
                    swept_at = time.monotonic()
                    await asyncio.to_thread(self.service.sweep_orphans, self.settings.orphan_min_age_s)
            except (DBAPIError, StorageError) as exc:  # the database or the store is briefly away: one line
                log.warning("retry worker: a pass failed (%s); trying again", str(exc).splitlines()[0][:200])
            except Exception:
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
    Returns ``{"out", "exported", "NORMAL", "PNEUMONIA", "studies"}`` (studies: the ids written)."""
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
    return {"out": str(out), "exported": len(manifest), **counts, "studies": [m["study"] for m in manifest]}


#: What an admin sees of a PACS study's original while its results wait to be sent (DICOM JSON tags).
PACS_FIELDS = {"00100010": "patient_name", "00100020": "patient_id", "00080050": "accession_number",
               "0020000D": "study_instance_uid", "00080020": "study_date"}


def pacs_summary(study: Study, cipher) -> dict | None:
    """Admins only: the identifying fields of a study received from a PACS, decrypted, while they are kept (until
    every result is sent back)."""
    from webapp.field_encryption import FieldKeyError

    if study.source != "PACS" or not study.pacs_original:
        return None
    try:
        kept = cipher.decrypt(study.pacs_original)
    except FieldKeyError as exc:  # the app's key is not the gateway's: say so instead of failing the page
        return {"error": str(exc)}
    summary = {}
    for tag, name in PACS_FIELDS.items():
        value = ((kept.get(tag) or {}).get("Value") or [None])[0]
        summary[name] = value.get("Alphabetic") if isinstance(value, dict) else value
    return summary


def study_json(study: Study, owner_name: str | None = None, identity: dict | None = None,
               report=None, pacs: dict | None = None) -> dict:
    """The study as the API shows it. ``identity``: the decrypted patient block (only for its owner or an admin:
    the callers' access check); ``report``: its newest report version; ``pacs``: an admin's view of a PACS
    study's kept original (:func:`pacs_summary`)."""
    from webapp.report import quality_advice

    base = f"/api/studies/{study.id}"
    result = None
    if study.status == "done":
        result = {"probability": study.probability, "label": study.label, "threshold": study.threshold,
                  "decision": study.shown_decision(), "decision_from_model_server": study.decision is not None,
                  "refer_reasons": study.refer_reasons or [], "ood_score": study.ood_score,
                  "in_intended_use": study.in_intended_use, "model_info": study.model_info,
                  "model_name": study.model_name, "model_version": study.model_version,
                  "quality_flags": study.quality_flags, "quality_warnings": quality_advice(study),
                  "cam_lung_share": study.cam_lung_share, "lung_share_source": study.lung_share_source,
                  "scored_at": _iso(study.scored_at), "inference_ms": study.inference_ms}
    feedback = None
    if study.feedback:
        feedback = {"verdict": study.feedback, "label": study.feedback_label, "at": _iso(study.feedback_at)}
    out = {"id": study.id, "status": study.status, "created_at": _iso(study.created_at), "note": study.note,
           "source": study.source,
           "image_format": study.image_format, "deidentified": study.deidentified, "result": result,
           "rejection": study.rejection, "attempts": study.attempts, "feedback": feedback,
           "report": None if report is None else {"version": report.version, "state": report.state,
                                                  "signed_at": _iso(report.signed_at)},
           "display": study.display,
           "links": {"self": base, "image": f"{base}/image", "heatmap": f"{base}/heatmap" if study.has_heatmap
                     else None, "cam": f"{base}/cam" if study.cam else None, "thumbnail": f"{base}/thumbnail",
                     "pixels": f"{base}/pixels" if study.display else None, "report": f"{base}/report",
                     "report_versions": f"{base}/report/versions", "page": f"/studies/{study.id}"}}
    if identity is not None:
        out["patient"] = identity
    if study.status == "pending":
        out["next_attempt_at"] = _iso(study.next_attempt_at)
    if owner_name is not None:
        out["owner"] = owner_name
    if pacs is not None:
        out["pacs"] = pacs
    return out


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if moment else None


__all__ = ["STATUSES", "SORTS", "StudyService", "clean_identity", "RetryWorker", "StudyFilter", "StudyNotFound", "StudyConflict", "study_json"]
