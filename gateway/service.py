"""The gateway as one process: the stages wired together, started and stopped in order.

The Storage SCP runs in pynetdicom's threads; the scorer, the outbox and the poller run as tasks of one asyncio
loop in a thread of their own (the scorer calls the transformer with the web app's async client). A film accepted
by the SCP wakes the scorer at once, and a queued result wakes the outbox, so nothing waits for the next poll.
Stopping closes the SCP first (no new films), then lets the workers finish the step they are in.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading

from gateway.intake import Intake
from gateway.metrics import serve_metrics
from gateway.outbox import Outbox
from gateway.score import Scorer
from gateway.settings import GatewaySettings
from gateway.storage_scp import StorageSCP
from webapp.settings import WebSettings

log = logging.getLogger(__name__)
#: Libraries whose INFO lines name UIDs or patients (highdicom: "copy attributes from dataset <UID>";
#: dicomweb-client: "store instances of study <UID>"): warnings only. Logs never carry PHI.
CHATTY_LIBRARIES = ("highdicom", "dicomweb_client", "pynetdicom", "pydicom", "httpx", "httpcore", "urllib3")


class GatewayError(Exception):
    """The gateway cannot start: one line for the operator."""


class Gateway:
    def __init__(self, settings: GatewaySettings, web: WebSettings):
        self.settings = settings
        self.web = web
        self.info: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._metrics = None
        self.scp: StorageSCP | None = None

    def start(self) -> dict:
        for name in CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
        from webapp.db import DatabaseError, make_engine, session_factory, upgrade
        from webapp.field_encryption import FieldKeyError
        from webapp.inference import InferenceClient
        from webapp.storage import ImageStore, StorageError
        from webapp.studies import StudyService

        try:
            self.engine = make_engine(self.web.resolved_database_url())
            upgrade(self.engine)
            store = ImageStore(self.web.resolved_image_store())
            store.check()
            cipher = self.web.field_cipher()
        except (DatabaseError, StorageError, FieldKeyError) as exc:
            raise GatewayError(str(exc)) from None
        self.factory = session_factory(self.engine)
        owner_id = self._service_user()
        destination = self.settings.destination()
        self.client = InferenceClient(self.web.inference_url, self.web.model_name, self.web.inference_timeout_s,
                                      host=self.web.inference_host)
        studies = StudyService(self.web, self.factory, store, self.client)
        self.outbox = Outbox(self.settings, self.factory, store, cipher, _sender(self.settings, destination))
        self.scorer = Scorer(self.settings, self.factory, store, cipher, studies, self.outbox,
                             send=destination is not None)
        self.intake = Intake(self.settings, self.factory, store, cipher, owner_id, self.web.deidentify_dicom,
                             scored=self._wake_scorer)
        workers = [self.scorer.run, self.outbox.run]
        if self.settings.pull:
            from gateway.dicomweb_poller import DicomwebPoller

            workers.append(DicomwebPoller(self.settings, self.factory, cipher, self.intake).run)
        self._start_loop(workers)
        self.scp = StorageSCP(self.settings, self.intake)
        try:
            port = self.scp.start()
        except OSError as exc:
            self.stop()
            raise GatewayError(f"cannot listen on {self.settings.host}:{self.settings.port} for DICOM: "
                               f"{exc.strerror or exc}") from None
        try:
            self._metrics = serve_metrics(self.settings.metrics_host, self.settings.metrics_port, self.ready)
        except OSError as exc:
            self.stop()
            raise GatewayError(f"cannot listen on {self.settings.metrics_host}:{self.settings.metrics_port} for "
                               f"metrics: {exc.strerror or exc}") from None
        if not self.settings.allowed_ae_titles():
            log.warning("any calling AE title may send films: set --allowed-aes (PNEUMOSCOPE_GATEWAY_ALLOWED_AES)")
        if destination is None:
            log.warning("no PACS to send results to (--send-to, or --pull): films are scored and recorded in the web "
                        "app only")
        self.info = {"ae_title": self.settings.ae_title, "dicom": f"{self.settings.host}:{port}",
                     "dicom_port": port, "metrics": f"http://{self.settings.metrics_host}:"
                                                    f"{self._metrics.server_address[1]}",
                     "send_to": destination.describe() if destination else None,
                     "pull": bool(self.settings.pull), "inference_url": self.web.inference_url}
        log.info("gateway %s listening on %s; results: %s", self.settings.ae_title, self.info["dicom"],
                 self.info["send_to"] or "recorded only")
        return self.info

    def _service_user(self) -> int:
        from webapp import accounts
        from webapp.db import transaction

        with transaction(self.factory) as db:
            user = accounts.find_user(db, self.settings.service_user)
            if user is None:
                # Nobody signs in as the service user: its password is random and never shown.
                user = accounts.add_user(db, self.settings.service_user, secrets.token_urlsafe(32))
                log.info("made the service user %s (owner of the studies received from the PACS)",
                         self.settings.service_user)
            return user.id

    def _wake_scorer(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.scorer.wake.set)

    def _start_loop(self, workers) -> None:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._stop = asyncio.Event()
            started.set()
            try:
                loop.run_until_complete(asyncio.gather(*(worker(self._stop) for worker in workers)))
                loop.run_until_complete(self.client.aclose())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="gateway-workers", daemon=True)
        self._thread.start()
        started.wait()

    def ready(self) -> tuple[bool, str]:
        from webapp.db import check_ready

        if self.scp is None or not self.scp.listening:
            return False, "the Storage SCP is not listening"
        if self._thread is None or not self._thread.is_alive():
            return False, "the workers stopped"
        return check_ready(self.engine)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.scp is not None:
            self.scp.stop()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics = None
        if getattr(self, "engine", None) is not None:
            self.engine.dispose()


def _sender(settings: GatewaySettings, destination):
    if destination is None:
        return None
    if destination.kind == "stow":
        from gateway.sender_stow import StowSender

        return StowSender(destination.url, settings.send_timeout_s)
    from gateway.sender_cstore import CStoreSender

    return CStoreSender(settings.ae_title, destination.ae_title, destination.host, destination.port,
                        settings.send_timeout_s)
