"""Pull mode: poll a PACS with QIDO-RS for CR and DX instances of recent studies and fetch the new ones with
WADO-RS (``dicomweb-client``), then hand each to :class:`gateway.intake.Intake` like a C-STORE.

"New" is decided by the gateway's records (the keyed fingerprint of the SOP Instance UID): an instance seen before,
scored or ignored, is not fetched again. The search covers studies dated today and ``pull_lookback_days`` before;
results of the gateway's own (SR, OT, DOC) never match CR or DX, so they are not pulled back in.
"""

from __future__ import annotations

import asyncio
import io
import logging
from datetime import date, timedelta

import requests
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.chest_filter import SCORED_MODALITIES
from gateway.intake import Intake
from gateway.metrics import POLLS
from gateway.records import GatewayInstance
from gateway.settings import DICOMWEB_ORIGIN, GatewaySettings
from gateway.worker import run_passes
from webapp.field_encryption import FieldCipher

log = logging.getLogger(__name__)

PAGE = 200
SOP_INSTANCE_UID, SERIES_INSTANCE_UID, STUDY_INSTANCE_UID = "00080018", "0020000E", "0020000D"


class DicomwebPoller:
    def __init__(self, settings: GatewaySettings, factory: sessionmaker[Session], cipher: FieldCipher,
                 intake: Intake):
        from dicomweb_client import DICOMwebClient

        self.settings = settings
        self.factory = factory
        self.cipher = cipher
        self.intake = intake
        self.client = DICOMwebClient(settings.pull, timeout=settings.send_timeout_s)
        self.client.set_http_retry_params(retry=False)  # the next poll is the retry

    def poll(self) -> dict:
        """One pass: returns {"found", "fetched", outcome: count}."""
        counts: dict = {"found": 0, "fetched": 0}
        since = (date.today() - timedelta(days=self.settings.pull_lookback_days)).strftime("%Y%m%d")
        for modality in SCORED_MODALITIES:
            offset = 0
            while True:
                page = self.client.search_for_instances(
                    search_filters={"Modality": modality, "StudyDate": f"{since}-"},
                    fields=[SOP_INSTANCE_UID, SERIES_INSTANCE_UID, STUDY_INSTANCE_UID], offset=offset, limit=PAGE)
                for item in page:
                    counts["found"] += 1
                    uids = [_value(item, tag) for tag in (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID)]
                    if not all(uids) or self._seen(uids[2]):
                        continue
                    outcome = self.intake.receive(self._fetch(*uids), DICOMWEB_ORIGIN)
                    counts["fetched"] += 1
                    counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
                if len(page) < PAGE:
                    break
                offset += len(page)
        return counts

    def _seen(self, sop_instance_uid: str) -> bool:
        with self.factory() as db:
            return db.scalar(select(GatewayInstance.id).where(
                GatewayInstance.fingerprint.in_(self.cipher.fingerprints(sop_instance_uid))).limit(1)) is not None

    def _fetch(self, study: str, series: str, instance: str) -> bytes:
        dataset = self.client.retrieve_instance(study, series, instance)
        if not getattr(dataset, "file_meta", None) or "TransferSyntaxUID" not in dataset.file_meta:
            dataset.file_meta = FileMetaDataset()
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        out = io.BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        return out.getvalue()

    async def run(self, stop: asyncio.Event) -> None:
        await run_passes("poller", self._one_poll, stop, asyncio.Event(), self.settings.pull_interval_s)

    async def _one_poll(self) -> bool:
        try:
            counts = await asyncio.to_thread(self.poll)
        except (requests.RequestException, ValueError) as exc:
            POLLS.labels("error").inc()
            log.warning("poll of the PACS failed (%s); trying again in %.0f s", type(exc).__name__,
                        self.settings.pull_interval_s)
            return False
        except Exception:
            POLLS.labels("error").inc()
            raise
        POLLS.labels("ok").inc()
        if counts["fetched"]:
            log.info("poll: %s", counts)
        return False


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])
