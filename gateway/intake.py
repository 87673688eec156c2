"""Receive one object, whatever brought it (the Storage SCP, the DICOMweb poller): check it, record it, answer.

The order never loses an accepted film and never keeps half of one: the size, the header, the duplicate check and
the chest filter come first; then the web app's own upload check (``webapp.uploads.check_upload``: PS3.15
de-identification, the decoder's cost bounds while it renders the preview); then the study row, its file, the
encrypted original modules and the gateway's record are written in one transaction. Only then is the sender told
"success". A duplicate (the same SOP Instance UID, by keyed fingerprint) is acknowledged and counted, never scored
twice. Every refusal is a DICOM failure status with a one-line comment; none of it names the patient.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from pydicom import uid as uids
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gateway import chest_filter, originals
from gateway.metrics import RECEIVED
from gateway.records import GatewayInstance
from gateway.settings import GatewaySettings
from webapp.db import transaction
from webapp.field_encryption import FieldCipher
from webapp.models import Study, utcnow
from webapp.storage import ImageStore
from webapp.uploads import UploadRejected, check_upload

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: PS3.4 annex B.2.3: "Refused: Out of Resources" (the object is larger than this gateway accepts).
OUT_OF_RESOURCES = 0xA700
#: PS3.4 annex B.2.3: "Error: Cannot understand" (C000-CFFF): not readable, not decodable, not accepted.
CANNOT_UNDERSTAND = 0xC000
#: Failures in processing (0x0110): a database or store that does not answer. The sender retries later.
PROCESSING_FAILURE = 0x0110
#: Read from the file meta alone before anything else: ``dcmread`` would inflate a Deflate data set whole.
NEVER_READ = frozenset({uids.DeflatedExplicitVRLittleEndian})


@dataclass(frozen=True)
class Outcome:
    status: int
    outcome: str  # the metric label
    comment: str = ""  # the DICOM ErrorComment (at most 64 characters are sent) and the log line
    study_id: int | None = None


class Intake:
    def __init__(self, settings: GatewaySettings, factory: sessionmaker[Session], store: ImageStore,
                 cipher: FieldCipher, owner_id: int, deidentify: bool, scored: Callable[[], None] = lambda: None):
        self.settings = settings
        self.factory = factory
        self.store = store
        self.cipher = cipher
        self.owner_id = owner_id
        self.deidentify = deidentify
        self.scored = scored  # wakes the scoring worker

    def receive(self, data: bytes, origin: str) -> Outcome:
        """Check and record one DICOM file (preamble and file meta included); ``origin`` is the calling AE title."""
        outcome = self._receive(data, origin)
        RECEIVED.labels(outcome.outcome).inc()
        level = logging.INFO if outcome.status == SUCCESS else logging.WARNING
        log.log(level, "from %s: %s%s", origin, outcome.outcome, f" ({outcome.comment})" if outcome.comment else "")
        if outcome.outcome == "accepted":
            self.scored()
        return outcome

    def _receive(self, data: bytes, origin: str) -> Outcome:
        if len(data) > self.settings.max_object_bytes:
            return Outcome(OUT_OF_RESOURCES, "refused_too_large", f"the object is {len(data)} bytes; this gateway "
                           f"accepts at most {self.settings.max_object_bytes}")
        header, refusal = _read_header(data)
        if refusal:
            return refusal
        sop_instance_uid = str(header.SOPInstanceUID).strip()
        fingerprints = self.cipher.fingerprints(sop_instance_uid)
        if self._seen(fingerprints):
            return Outcome(SUCCESS, "duplicate", "this SOP instance was received before; one result is enough")
        verdict = chest_filter.classify(header)
        if not verdict.score:
            return self._ignore(fingerprints[0], origin, verdict)
        if "PixelData" not in header:
            return Outcome(CANNOT_UNDERSTAND, "refused_no_pixel_data", "the object has no pixel data: no image to "
                                                                       "score")
        try:
            kept = originals.extract(header)
        except originals.MissingIdentity as exc:
            return Outcome(CANNOT_UNDERSTAND, "refused_no_uid", str(exc))
        try:
            # The web app's own check: de-identification, and the decoder's cost bounds (transfer syntax allow-list,
            # pixels and bytes declared, compressed frames bounded) while it renders the preview.
            upload = check_upload(data, "application/dicom", deidentify=self.deidentify)
        except UploadRejected as exc:
            return Outcome(CANNOT_UNDERSTAND, f"refused_{exc.code}", str(exc))
        return self._record(fingerprints[0], origin, upload, self.cipher.encrypt(kept))

    def _seen(self, fingerprints: list[str]) -> bool:
        with self.factory() as db:
            return db.scalar(select(GatewayInstance.id).where(GatewayInstance.fingerprint.in_(fingerprints))
                             .limit(1)) is not None

    def _ignore(self, fingerprint: str, origin: str, verdict: chest_filter.Verdict) -> Outcome:
        try:
            with transaction(self.factory) as db:
                db.add(GatewayInstance(fingerprint=fingerprint, state="ignored", reason=verdict.reason,
                                       calling_ae=origin[:16], finished_at=utcnow()))
        except IntegrityError:
            return Outcome(SUCCESS, "duplicate", "this SOP instance was received before")
        return Outcome(SUCCESS, f"ignored_{verdict.reason}", verdict.detail)

    def _record(self, fingerprint: str, origin: str, upload, original_token: str) -> Outcome:
        prefix = self.store.new_prefix()
        try:
            with transaction(self.factory) as db:
                now = utcnow()
                study = Study(owner_id=self.owner_id, note="", source="PACS", pacs_original=original_token,
                              storage_prefix=prefix, image_format="dicom", image_sha256=upload.sha256,
                              image_bytes=len(upload.data), has_preview=upload.preview_png is not None,
                              deidentified=upload.deidentified, status="pending", created_at=now,
                              next_attempt_at=now - timedelta(seconds=1))
                db.add(study)
                db.flush()
                db.add(GatewayInstance(fingerprint=fingerprint, state="scoring", calling_ae=origin[:16],
                                       received_at=now, study_id=study.id))
                db.flush()  # a concurrent copy of the same instance fails here, before the files are written
                self.store.put(study.image_key(), upload.data)
                if upload.preview_png is not None:
                    self.store.put(study.preview_key(), upload.preview_png)
                study_id = study.id
        except IntegrityError:
            self.store.delete_prefix(prefix)
            return Outcome(SUCCESS, "duplicate", "this SOP instance was received before")
        except Exception as exc:  # the database or the store: the sender keeps the film and tries again
            self.store.delete_prefix(prefix)
            log.error("cannot record a received film: %s", str(exc).splitlines()[0][:300] if str(exc) else
                      type(exc).__name__)
            return Outcome(PROCESSING_FAILURE, "refused_storage", "the gateway cannot store the film now; send it "
                                                                  "again later")
        return Outcome(SUCCESS, "accepted", f"study {study_id}", study_id)


def _read_header(data: bytes):
    """(data set, None) or (None, refusal). The file is in memory already (at most ``max_object_bytes``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from model.dicom import ALLOWED_SYNTAXES, transfer_syntax
    from model.errors import InvalidImageError

    try:
        syntax = transfer_syntax(data) if data[128:132] == b"DICM" else None  # the file meta alone
    except InvalidImageError:
        syntax = None
    if not syntax:
        return None, Outcome(CANNOT_UNDERSTAND, "refused_not_dicom", "the object is not a readable DICOM file")
    if syntax in NEVER_READ:
        return None, _refuse_syntax(syntax)
    try:
        header = pydicom.dcmread(io.BytesIO(data))
        for _element in header:  # iterating converts every raw element: a malformed one fails here, not later
            pass
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, IndexError, TypeError, OverflowError,
            AttributeError, NotImplementedError):
        return None, Outcome(CANNOT_UNDERSTAND, "refused_not_dicom", "the data set cannot be read (not DICOM, "
                                                                     "truncated or corrupt)")
    if not all(str(header.get(name, "") or "").strip() for name in ("SOPClassUID", "SOPInstanceUID")):
        return None, Outcome(CANNOT_UNDERSTAND, "refused_not_dicom", "the data set cannot be read as a DICOM object "
                                                                     "(no SOP Class or SOP Instance UID)")
    if syntax not in ALLOWED_SYNTAXES and chest_filter.classify(header).score:
        return None, _refuse_syntax(syntax)
    return header, None


def _refuse_syntax(syntax: str) -> Outcome:
    return Outcome(CANNOT_UNDERSTAND, "refused_transfer_syntax", f"transfer syntax {uids.UID(syntax).name} is not "
                   "accepted; send uncompressed, RLE, JPEG or JPEG 2000")
