"""Fixtures for the DICOM gateway's tests (a pytest plugin, registered in conftest.py). Holds no tests itself.

A real PACS: Debian's Orthanc with its DICOMweb and web-viewer plugins, started as an unprivileged user in a
temporary folder with a generated configuration on free ports. Real films: chest X-rays from
../shared/data/chest_xray_full wrapped as 16-bit DX objects of realistic size (upsampled to about 2,500 px, about
10 MB) with patient tags filled in. The real transformer and predictor (``serving.stack.LocalStack`` on the small
test bundle) and the gateway as a real process (``python -m gateway``), started and stopped by PID.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO
from serving_fixtures import first_line
from webapp_fixtures import PG_USER, _ensure_pg_user, free_port, full_res_xrays, stop

ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
EXAMPLES = REPO / "docs" / "platform" / "pacs"
ORTHANC_AET = "ORTHANC"
GATEWAY_AET = "PNEUMOSCOPE"
SENDER_AET = "MODALITY1"
PATIENT = {"PatientName": "Roe^Richard^MARKER", "PatientID": "MRN-GW-0042", "PatientBirthDate": "19650302",
           "PatientSex": "M", "AccessionNumber": "ACC-GW-31337", "ReferringPhysicianName": "Grey^Meredith",
           "InstitutionName": "St. Elsewhere", "StudyID": "S42", "StudyDescription": "CHEST PA"}
SR, SC, PDF = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.1"


# -- films -----------------------------------------------------------------------------------------------

def chest_dx(source: Path | None = None, side: int = 2500, modality: str = "DX", body_part: str = "CHEST",
             frames: int = 1, study_uid: str | None = None, **tags) -> bytes:
    """A real chest X-ray as a 16-bit DX (or ``modality``) Part 10 file, its longer side upsampled to ``side``."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    with Image.open(source or full_res_xrays(1)[0]) as image:
        gray = image.convert("F")
    scale = side / max(gray.size)
    gray = gray.resize((round(gray.width * scale), round(gray.height * scale)), Image.BICUBIC)
    pixels = np.clip(np.asarray(gray) * 257.0, 0, 65535).astype(np.uint16)  # 8-bit film -> 16-bit detector range
    sop_class = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1",
                 "CT": "1.2.840.10008.5.1.4.1.1.2"}.get(modality, "1.2.840.10008.5.1.4.1.1.7")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate, ds.StudyTime = modality, time.strftime("%Y%m%d"), "101500"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    if body_part:
        ds.BodyPartExamined = body_part
    ds.PatientOrientation = ["L", "F"]
    for key, value in {**PATIENT, **tags}.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_film(folder: Path, data: bytes, name: str = "film.dcm") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def uids_of(data: bytes) -> tuple[str, str]:
    """(StudyInstanceUID, SOPInstanceUID) of a Part 10 file."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


# -- the PACS -------------------------------------------------------------------------------------------

@dataclass
class Orthanc:
    root: Path
    http_port: int
    dicom_port: int
    config: dict
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.root / "orthanc.log"

    def start(self, timeout: float = 60.0) -> "Orthanc":
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config, indent=1))
        for sub in ("storage", "index"):
            (self.root / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            _ensure_pg_user()
            for entry in [self.root, *self.root.rglob("*")]:
                shutil.chown(entry, PG_USER)
        argv = [str(ORTHANC), f"--logfile={self.log}", str(path)]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", PG_USER, "--", *argv]  # unprivileged, like a hospital's service account
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc did not answer within {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)  # runuser passes SIGTERM on to Orthanc
            self.process = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    # -- what the tests read back --
    def qido_instances(self, study_uid: str) -> list[dict]:
        answer = httpx.get(f"{self.dicomweb}/studies/{study_uid}/instances", timeout=10,
                           params={"includefield": "00080016,00080060,0008103E"})
        if answer.status_code in (204, 404):
            return []
        answer.raise_for_status()
        return answer.json()

    def sop_classes(self, study_uid: str) -> list[str]:
        return sorted(item["00080016"]["Value"][0] for item in self.qido_instances(study_uid))

    def wait_for_classes(self, study_uid: str, wanted: set[str], timeout: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        while time.monotonic() < deadline:
            found = self.qido_instances(study_uid)
            if wanted <= {item["00080016"]["Value"][0] for item in found}:
                return found
            time.sleep(0.25)
        raise AssertionError(f"after {timeout:.0f} s the study holds {[i['00080016']['Value'][0] for i in found]}, "
                             f"not all of {sorted(wanted)}")

    def orthanc_id(self, sop_instance_uid: str) -> str:
        found = httpx.post(f"{self.url}/tools/lookup", content=sop_instance_uid, timeout=10).json()
        return next(item["ID"] for item in found if item["Type"] == "Instance")

    def instance_file(self, sop_instance_uid: str) -> bytes:
        return httpx.get(f"{self.url}/instances/{self.orthanc_id(sop_instance_uid)}/file", timeout=30).content

    def upload(self, data: bytes) -> dict:
        answer = httpx.post(f"{self.url}/instances", content=data, timeout=60)
        answer.raise_for_status()
        return answer.json()


def orthanc_config(root: Path, http_port: int, dicom_port: int, gateway_port: int | None = None,
                   lua: Path | None = None, example: bool = False) -> dict:
    """A test Orthanc's configuration; ``example``: docs/platform/pacs/orthanc-pneumoscope.json (the documented
    one) with only the machine-specific values replaced (folders, ports, the gateway's address, the script's path)."""
    config = json.loads((EXAMPLES / "orthanc-pneumoscope.json").read_text()) if example else {
        "Name": "pneumoscope-test", "DicomAet": ORTHANC_AET,
        "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so"), str(ORTHANC_PLUGINS / "libOrthancWebViewer.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    config.update({"StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
                   "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
                   "AuthenticationEnabled": False, "StableAge": 1, "ConcurrentJobs": 2, "HttpTimeout": 30,
                   "WebViewer": {"CachePath": str(root / "webviewer-cache")}})
    if gateway_port is not None:
        aet = (config.get("DicomModalities") or {}).get("pneumoscope", [GATEWAY_AET])[0]
        config["DicomModalities"] = {"pneumoscope": [aet, "127.0.0.1", gateway_port]}
    if lua is not None:
        config["LuaScripts"] = [str(lua)]
    elif not example:
        config.pop("LuaScripts", None)
    return config


@contextlib.contextmanager
def running_orthanc(gateway_port: int | None = None, lua: Path | None = None, example: bool = False):
    if not ORTHANC.exists():
        pytest.fail(f"{ORTHANC} not found: run `make deps-gateway` (apt-get install orthanc orthanc-dicomweb "
                    "orthanc-webviewer dcmtk dicom3tools)")
    root = Path(tempfile.mkdtemp(prefix="pneumoscope-orthanc-"))  # under /tmp: the unprivileged user reads it
    if lua is not None:
        shutil.copy(lua, root / lua.name)
        lua = root / lua.name
    http_port, dicom_port = free_port(), free_port()
    server = Orthanc(root, http_port, dicom_port, orthanc_config(root, http_port, dicom_port, gateway_port, lua,
                                                                 example))
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- the transformer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def transformer_url():
    """The real transformer + predictor on the small test bundle (no web app): the gateway's inference URL."""
    from conftest import require_shared

    require_shared("chest_xray_224/train/NORMAL")
    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack
    from serving_fixtures import free_port_pair, shared_bundle

    bundle, _ = shared_bundle()
    settings = ServingSettings(model_sha256=Bundle.load(bundle, verify=False).sha256, threads=2,
                               engine="onnxruntime")
    log = Path(tempfile.mkdtemp(prefix="pneumoscope-gw-stack-")) / "stack.log"
    stack = LocalStack(str(bundle), free_port_pair(), settings, log_file=log)
    stack.start(timeout=300)
    try:
        yield stack.info["rest"]
    finally:
        stack.stop()
        shutil.rmtree(log.parent, ignore_errors=True)


# -- the gateway ------------------------------------------------------------------------------------------

@dataclass
class GatewayProcess:
    process: subprocess.Popen
    info: dict
    log: Path
    home: Path
    env: dict = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.info["dicom_port"]

    @property
    def metrics_url(self) -> str:
        return self.info["metrics"]

    def metric(self, name: str, **labels) -> float:
        """The value of one sample of the gateway's /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.metrics_url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def stop(self) -> int:
        stop(self.process, 40)
        return self.process.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def gateway_env(home: Path, inference_url: str, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMOSCOPE_")}
    env.update({"PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_INFERENCE_URL": inference_url,
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "PNEUMOSCOPE_GATEWAY_METRICS_PORT": "0",
                "PNEUMOSCOPE_GATEWAY_WORKER_POLL_S": "0.25", "PNEUMOSCOPE_GATEWAY_SEND_RETRY_INITIAL_S": "0.5",
                "PNEUMOSCOPE_GATEWAY_SEND_RETRY_MAX_S": "1", "PNEUMOSCOPE_RETRY_INITIAL_S": "0.5",
                "PNEUMOSCOPE_RETRY_MAX_S": "1"})
    env.update({f"PNEUMOSCOPE_GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_gateway(home: Path, inference_url: str, port: int | None = None, args: list[str] = (),
                  timeout: float = 120.0, **settings) -> GatewayProcess:
    """``python -m gateway`` as a real process; waits for its READY line."""
    home.mkdir(parents=True, exist_ok=True)
    env = gateway_env(home, inference_url, **settings)
    log = home / "gateway.log"
    argv = [sys.executable, "-m", "gateway", "--port", str(port or free_port()), *args]
    handle = open(log, "ab")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=handle, text=True, env=env, cwd=REPO)
    handle.close()
    line = first_line(process, timeout)
    if not line.startswith("READY "):
        stop(process)
        raise AssertionError(f"no READY line from the gateway (got {line!r}): "
                             f"{log.read_text(errors='replace')[-3000:]}")
    return GatewayProcess(process, json.loads(line[len("READY "):]), log, home, env)


def storescu(path: Path, port: int, calling: str = SENDER_AET, called: str = GATEWAY_AET,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """dcmtk's storescu sends one file to 127.0.0.1:port."""
    if shutil.which("storescu") is None:
        pytest.fail("storescu not found: run `make deps-gateway` (apt-get install dcmtk)")
    return subprocess.run(["storescu", "-aet", calling, "-aec", called, "-v", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=timeout)


def dciodvfy(data: bytes, folder: Path, name: str) -> str:
    """dicom3tools' dciodvfy on one object: its full report (errors are lines starting with 'Error')."""
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: run `make deps-gateway` (apt-get install dicom3tools)")
    path = write_film(folder, data, name)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


# -- a PACS that misbehaves on demand ---------------------------------------------------------------------

class FaultyFront:
    """An HTTP front of a real Orthanc's DICOMweb service that answers STOW-RS (POST) from a fault plan: each
    planned fault answers one POST instead of Orthanc ("500", "409") or after it ("garbage": Orthanc stores the
    object, the gateway gets an unreadable 200). A fault may be ``(fault, SOP class UID)``: it waits for a POST of
    that class (the gateway sends a film's results side by side, in no set order). Everything else is forwarded."""

    def __init__(self, orthanc: Orthanc):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.orthanc = orthanc
        self.plan: list = []
        self.lock = threading.Lock()
        self.posts: list[str] = []  # what each POST got: forwarded, or the fault
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                answer = httpx.get(front.orthanc.url + self.path, timeout=30)
                self._reply(answer.status_code, answer.content, answer.headers.get("content-type", ""))

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                fault = front.take_fault(body)
                front.posts.append(fault)
                if fault == "500":
                    return self._reply(500, b"internal error", "text/plain")
                if fault == "409":
                    failed = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xA900]}}]}}
                    return self._reply(409, json.dumps(failed).encode(), "application/dicom+json")
                answer = httpx.post(front.orthanc.url + self.path, content=body, timeout=60,
                                    headers={"content-type": self.headers["content-type"]})
                if fault == "garbage":
                    return self._reply(200, b"{not json", "application/dicom+json")
                self._reply(answer.status_code, answer.content, answer.headers.get("content-type", ""))

            def _reply(self, status, body, content_type):
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take_fault(self, body: bytes) -> str:
        with self.lock:
            for index, planned in enumerate(self.plan):
                fault, sop_class = planned if isinstance(planned, tuple) else (planned, None)
                if sop_class is None or sop_class.encode() in body:
                    del self.plan[index]
                    return fault
        return "forward"

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def c_store(path: Path, port: int, calling: str = SENDER_AET, called: str = GATEWAY_AET) -> tuple[int, str]:
    """Send one file's bytes as they are (pynetdicom's chunked send: the data set is not decoded, so a broken one
    travels broken); returns (status, ErrorComment)."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    meta = read_file_meta_info(path)
    ae = AE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "no association with the gateway"
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
    return int(status.Status), str(status.get("ErrorComment", ""))


def part10(ds, syntax: str | None = None) -> bytes:
    """A data set as a Part 10 file (its file meta made from it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def study_count(home: Path, source: str = "PACS") -> int:
    """Studies of ``source`` in the gateway's (SQLite) database."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(home / "webapp.db")) as db:
        return db.execute("SELECT count(*) FROM studies WHERE source = ?", (source,)).fetchone()[0]
