"""The DICOM Storage SCP (pynetdicom): C-STORE of any storage SOP class in any transfer syntax, and C-ECHO.

Associations must call this gateway's AE title; calling AE titles outside the allow-list are rejected at
association (A-ASSOCIATE-RJ "calling AE title not recognised"), logged and counted. A received data set goes to
disk as it arrives (pynetdicom's chunked receive: a 30 MB film never sits twice in memory), then to
:class:`gateway.intake.Intake`, whose status is the C-STORE response. Every transfer syntax is accepted at
association, so that objects the gateway does not score are acknowledged, not refused; one it would score in a
syntax the decoder refuses gets a failure status that says which.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from gateway.intake import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Intake, Outcome
from gateway.metrics import ASSOCIATIONS, RECEIVED
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Received data sets are written to a temporary file as they arrive (TMPDIR: an emptyDir on a read-only pod).
_config.STORE_RECV_CHUNKED_DATASET = True
#: PS3.7 C.5.2: the longest ErrorComment is 64 characters.
COMMENT_CHARS = 64


class StorageSCP:
    def __init__(self, settings: GatewaySettings, intake: Intake):
        self.settings = settings
        self.intake = intake
        self.server = None

    def start(self) -> int:
        """Listen (in pynetdicom's threads); returns the port."""
        ae = AE(self.settings.ae_title)
        ae.require_called_aet = True  # a PACS must address this gateway by its AE title
        ae.require_calling_aet = self.settings.allowed_ae_titles()
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.network_timeout_s
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected)]
        self.server = ae.start_server((self.settings.host, self.settings.port), block=False, evt_handlers=handlers)
        return self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def listening(self) -> bool:
        return self.server is not None

    # -- handlers (each runs in the association's thread) ------------------------------------------------
    def _on_accepted(self, event) -> None:
        ASSOCIATIONS.labels("accepted").inc()

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) rejected: the calling AE title is not allowed or the called AE title "
                    "is not %s", requestor.ae_title, requestor.address, self.settings.ae_title)
        ASSOCIATIONS.labels("rejected").inc()

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> Dataset:
        calling = event.assoc.requestor.ae_title
        try:
            outcome = self._receive(Path(event.dataset_path), calling)
        except Exception:  # never a crash: the sender gets a failure status, the log gets the traceback
            log.exception("C-STORE from %s: unexpected error", calling)
            RECEIVED.labels("refused_error").inc()
            outcome = Outcome(0x0110, "refused_error", "the gateway failed to process the object")
        status = Dataset()
        status.Status = outcome.status
        if outcome.status != 0x0000 and outcome.comment:
            status.ErrorComment = outcome.comment[:COMMENT_CHARS]
        return status

    def _receive(self, path: Path, calling: str) -> Outcome:
        size = path.stat().st_size
        if size > self.settings.max_object_bytes:  # before reading it into memory
            outcome = Outcome(OUT_OF_RESOURCES, "refused_too_large", f"the object is {size} bytes; this gateway "
                              f"accepts at most {self.settings.max_object_bytes}")
            RECEIVED.labels(outcome.outcome).inc()
            log.warning("from %s: %s (%s)", calling, outcome.outcome, outcome.comment)
            return outcome
        try:
            data = path.read_bytes()
        except OSError:
            return Outcome(CANNOT_UNDERSTAND, "refused_not_dicom", "the received object could not be read back")
        return self.intake.receive(data, calling)
