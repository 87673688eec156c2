"""Fixtures for the web app's tests (a pytest plugin, registered in conftest.py). Holds no tests itself.

Session-wide, started once: a real PostgreSQL 15 (``initdb`` + ``pg_ctl`` as an unprivileged user in a
temporary folder, on a free port), a real ``moto_server`` for S3, and the real serving stack started by
``pneumoscope serve`` (predictor + transformer + the web app on PORT+2) on a test model bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pwd
import queue
import shutil
import signal
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

from conftest import REPO, SHARED_DATA, require_shared

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "pneumoscope-test"  # PostgreSQL refuses to run as root
VENV_BIN = Path(sys.executable).parent
XRAY_FULL = SHARED_DATA / "chest_xray_full" / "train"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "webapp"
PASSWORD = "a-long-test-password"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen | None = None, timeout: float = 120.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


# -- images ------------------------------------------------------------------------------------------

def full_res_xrays(n: int = 2, offset: int = 0) -> list[Path]:
    """Real full-resolution X-rays, alternating NORMAL / PNEUMONIA."""
    require_shared("chest_xray_full")
    by_class = [sorted((XRAY_FULL / cls).iterdir()) for cls in ("NORMAL", "PNEUMONIA")]
    return [by_class[i % 2][offset + i // 2] for i in range(n)]


def colour_photo_png(size: int = 256) -> bytes:
    """A colourful picture: the transformer's X-ray gate refuses it with 422."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="PNG")
    return out.getvalue()


PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-445566", "PatientBirthDate": "19790412",
       "PatientAddress": "12 Elm Street, Springfield", "InstitutionName": "Springfield General Hospital",
       "AccessionNumber": "ACC-778899", "ReferringPhysicianName": "House^Gregory", "OtherPatientIDs": "OID-1234"}


def make_dicom(source: Path | None = None, pixels: bool = True, phi: dict | None = None) -> bytes:
    """A DX DICOM file carrying identifying attributes (``phi``, default PHI; and a private tag), with a real
    X-ray's pixels."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate = "DX", "20240301"
    for key, value in (phi or PHI).items():
        setattr(ds, key, value)
    ds.add_new((0x0029, 0x0010), "LO", "ACME SCANNER")
    ds.add_new((0x0029, 0x1001), "LO", f"private note about {(phi or PHI)['PatientName']}")
    if pixels:
        with Image.open(source or full_res_xrays(1)[0]) as image:
            gray = np.asarray(image.convert("L"), dtype=np.uint16) * 16  # as a 12-bit detector would
        ds.Rows, ds.Columns = gray.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = gray.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# -- PostgreSQL ---------------------------------------------------------------------------------------

@dataclass
class Postgres:
    port: int
    data: Path
    log: Path
    databases: list[str] = field(default_factory=list)
    options: str = ""  # the server's command-line options, for a restart

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``: ``fast`` (clients disconnected, clean shutdown) or ``immediate`` (a crash)."""
        subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        started = subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                              "-o", self.options, "-w", "-t", "60", "start"]),
                                 capture_output=True, text=True, timeout=90)
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start again: {started.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_pg_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", PG_USER, "--", *argv]


def _ensure_pg_user() -> None:
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)


@contextlib.contextmanager
def running_postgres(durable: bool = False):
    """Start a throw-away PostgreSQL 15 in a temporary folder on a free port; stop and remove it after.

    Fast by default (``synchronous_commit=off``: a crash may lose the last commits, which no test of the
    default kind does). ``durable``: commits are acknowledged only once in the WAL, as in production, for the
    tests that crash the server and count what survives (fsync stays off: a process crash, not a power cut)."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL 15 not found at {PG_BIN}: run `make deps-web` (apt-get install postgresql-15)")
    _ensure_pg_user()
    root = Path(tempfile.mkdtemp(prefix="pneumoscope-pg-"))  # under /tmp: pytest's tmp is root-only
    data, log = root / "data", root / "postgres.log"
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
    try:
        subprocess.run(_as_pg_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                    "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        port = free_port()
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off " \
                  f"-c max_connections=200" + ("" if durable else " -c synchronous_commit=off")
        started = subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o",
                                              options, "-w", "-t", "60", "start"]), capture_output=True, text=True)
        if started.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{tail}")
        try:
            yield Postgres(port, data, log, options=options)
        finally:
            subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 15 for the session; it needs Debian's postgresql-15 (`make deps-web`)."""
    try:
        server = running_postgres()
        started = server.__enter__()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield started
    finally:
        server.__exit__(None, None, None)


# -- S3 (moto) ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto_endpoint():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", process, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def s3_environment(endpoint: str) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)


# -- the serving stack with the web app -----------------------------------------------------------------

@dataclass
class WebStack:
    info: dict
    process: subprocess.Popen
    root: Path
    env: dict
    log: Path

    @property
    def rest(self) -> str:
        return self.info["rest"]

    @property
    def web(self) -> str:
        return self.info["web"]

    def predictor_ready(self) -> bool:
        try:
            url = f"{self.info['predictor_rest']}/v2/models/pneumonia/ready"
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def predictor_pid(stack) -> int:
    """The predictor's PID now (the stack restarts it with a new one after a kill)."""
    return stack_child_pid(stack, "serving.predictor_main")


def stack_child_pid(stack, module: str) -> int:
    """The PID of the stack's child that runs ``module`` now (``serving.transformer_main``, ``webapp``...)."""
    serve = stack.process.pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == serve and module.encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no {module} process under the stack")


def pneumoscope(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 120):
    return subprocess.run([str(VENV_BIN / "pneumoscope"), *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory):
    """``pneumoscope serve`` on a random-weights test bundle: predictor, transformer and web app."""
    require_shared("chest_xray_224/train/NORMAL")
    sys.path.insert(0, str(Path(__file__).parent))
    from serving.stack import port_free
    from serving_fixtures import build_bundle, free_port_pair

    root = tmp_path_factory.mktemp("webstack")
    bundle, _ = build_bundle(root / "bundle")
    home = root / "home"
    env = {**os.environ, "PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_THREADS": "2", "PYTHONUNBUFFERED": "1",
           "PNEUMOSCOPE_SECRET_KEY": "web-stack-secret", "PNEUMOSCOPE_RETRY_INITIAL_S": "0.5",
           "PNEUMOSCOPE_RETRY_MAX_S": "2", "PNEUMOSCOPE_WORKER_POLL_S": "0.25", "PNEUMOSCOPE_INLINE_WAIT_S": "30"}
    made = pneumoscope("users", "add", "doctor", "--password-stdin", env=env, stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    port = free_port_pair(21100, 21990)  # the web app's fixed range; PORT+2 must be free too
    while not port_free(port + 2):
        port = free_port_pair(21100, 21990)
    log = root / "stack.log"
    from model.bundle import Bundle

    digest = Bundle.load(bundle, verify=False).sha256  # a folder is served with its expected digest
    process = subprocess.Popen([str(VENV_BIN / "pneumoscope"), "serve", "--model", str(bundle), "--sha256", digest,
                                "--port", str(port), "--log-file", str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=root)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=300)
    except queue.Empty:
        line = ""
    if not line.startswith("READY "):
        stop(process)
        pytest.fail(f"no READY line (got {line!r}); log: {log.read_text()[-3000:] if log.exists() else ''}")
    stack = WebStack(json.loads(line[len("READY "):]), process, root, env, log)
    try:
        yield stack
    finally:
        stop(process, 30)




def api_token(env: dict, user: str = "doctor", password: str | None = None) -> str:
    """A token for ``user`` in the database ``env`` names (the user is created when a password is given)."""
    from webapp import accounts
    from webapp.db import make_engine, session_factory, transaction, upgrade
    from webapp.settings import WebSettings

    settings = WebSettings(home=Path(env["PNEUMOSCOPE_HOME"]), database_url=env.get("PNEUMOSCOPE_DATABASE_URL"))
    engine = make_engine(settings.resolved_database_url())
    upgrade(engine)
    with transaction(session_factory(engine)) as db:
        if password and accounts.find_user(db, user) is None:
            accounts.add_user(db, user, password)
        token = accounts.issue_token(db, user, "tests")[0]
    engine.dispose()
    return token


# -- a web app process of its own ----------------------------------------------------------------------

@dataclass
class WebProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop(self.process)


def start_web(env: dict, log: Path, port: int | None = None) -> WebProcess:
    """``python -m webapp`` as a real uvicorn process; waits for /readyz."""
    port = port or free_port()
    handle = open(log, "ab")
    process = subprocess.Popen([sys.executable, "-m", "webapp", "--port", str(port)], stdout=handle,
                               stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    handle.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", process, 120, log)
    except BaseException:
        stop(process)
        raise
    return WebProcess(url, process, log)


def wait_for_status(get, study_id: int, want: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    body = {}
    while time.monotonic() < deadline:
        body = get(f"/api/studies/{study_id}").json()
        if body["status"] == want:
            return body
        time.sleep(0.25)
    raise AssertionError(f"study {study_id} is {body.get('status')}, not {want}, after {timeout:.0f} s: {body}")


# -- the browser ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (no browser download); screenshots go to ARTIFACTS."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run `make deps-web` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


# -- the reading room: films and results made for a test ---------------------------------------------------

def cam_grid(rows: int, cols: int, hot: dict[tuple[int, int], float]) -> dict:
    """A class-activation map grid (the transformer's ``cam`` for one image): zero but the ``hot`` cells."""
    values = np.zeros((rows, cols), dtype=np.float32)
    for (row, col), value in hot.items():
        values[row, col] = value
    return {"rows": rows, "cols": cols, "values": [float(v) for v in values.ravel()]}


def store_result(env: dict, study_id: int, **fields) -> None:
    """Give a study a whole result of the test's making through the storage layer
    (``StudyService.record_result``), as the transformer's answer would: a REFER with known reasons, a film
    outside the intended use, a CAM with known hot spots. ``fields`` override a plain NORMAL answer; every
    other result field (decision, reasons, OOD score, intended use, model description, CAM, lung mask and
    share) is stored as "no value", so nothing of the answer the real model server gave at upload remains.

    The study is put back to pending first: a study already scored keeps its first result (a late duplicate
    answer is dropped, ``StudyService._mark_done``), and uploads in tests are scored inline."""
    from sqlalchemy import update

    from webapp.db import make_engine, session_factory, transaction
    from webapp.inference import InferenceResult
    from webapp.models import Study
    from webapp.settings import WebSettings
    from webapp.storage import ImageStore
    from webapp.studies import StudyService

    settings = WebSettings(home=Path(env["PNEUMOSCOPE_HOME"]), database_url=env.get("PNEUMOSCOPE_DATABASE_URL"),
                           image_store=env.get("PNEUMOSCOPE_IMAGE_STORE"))
    engine = make_engine(settings.resolved_database_url())
    answer = {"probability": 0.1, "label": "NORMAL", "threshold": 0.5, "model_name": "pneumonia",
              "model_version": "7", "heatmap_png": None, **fields}
    try:
        factory = session_factory(engine)
        with transaction(factory) as db:
            db.execute(update(Study).where(Study.id == study_id).values(status="pending"))
        stored = StudyService(settings, factory, ImageStore(settings.resolved_image_store()), None) \
            .record_result(study_id, InferenceResult(**answer))
        # a dropped answer would leave the served one in place and a test would check the wrong result
        assert (stored.probability, stored.decision) == (answer["probability"], answer.get("decision")), \
            f"study {study_id} kept another result"
    finally:
        engine.dispose()


# -- consistency of what the web app stored ---------------------------------------------------------------

def rows(database_url: str) -> dict[int, tuple[str, str, str, str]]:
    """{study id: (storage prefix, image format, sha256, status)} straight from the database."""
    from sqlalchemy import select

    from webapp.db import make_engine
    from webapp.models import Study

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return {r.id: (r.storage_prefix, r.image_format, r.image_sha256, r.status) for r in connection.execute(
                select(Study.id, Study.storage_prefix, Study.image_format, Study.image_sha256, Study.status))}
    finally:
        engine.dispose()


def film_with_marker(source: Path, box: tuple[float, float, float, float], value: int = 255) -> bytes:
    """A real X-ray (PNG) with a filled square planted at ``box`` = (y0, x0, y1, x1), shares of the height/width."""
    from PIL import Image

    with Image.open(source) as image:
        gray = np.asarray(image.convert("L")).copy()
    height, width = gray.shape
    y0, x0, y1, x1 = box
    gray[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)] = value
    out = io.BytesIO()
    Image.fromarray(gray).save(out, format="PNG")
    return out.getvalue()


def dicom_16bit(source: Path, window: tuple[float, float] | None = None, monochrome1: bool = False,
                view: str = "PA") -> bytes:
    """A DX DICOM with 12 bits of real content: the film's grey values x 16, constant over each 16-pixel run of a
    row, plus a ramp of 0..15 along the run: detail an 8-bit rendering cannot hold. ``window``: (centre, width)
    written as the file's own Window Center/Width; ``view``: its View Position."""
    import pydicom

    data = make_dicom(source)
    dataset = pydicom.dcmread(io.BytesIO(data))
    pixels = dataset.pixel_array.astype(np.uint16)
    columns = np.arange(pixels.shape[1])
    ramp = (columns % 16).astype(np.uint16)[None, :]
    pixels = np.minimum(pixels[:, columns - columns % 16] + ramp, 4095).astype(np.uint16)
    if monochrome1:
        pixels = 4095 - pixels
        dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.PixelData = pixels.tobytes()
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    dataset.ViewPosition = view
    dataset.ReasonForTheRequestedProcedure = "fever and cough for three days"
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def assert_rows_and_files_agree(database_url: str, images: Path) -> dict:
    """Every row has its whole file; every stored file belongs to a row; no half-written file is left."""
    stored = rows(database_url)
    extensions = {"jpeg": "jpg", "png": "png", "dicom": "dcm"}
    for study, (prefix, image_format, digest, _) in stored.items():
        path = images / prefix / f"image.{extensions[image_format]}"
        assert path.is_file(), f"study {study}: a row without its file"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"study {study}: a file not stored whole"
    folders = {p.name for p in images.iterdir()} if images.exists() else set()
    assert folders == {prefix for prefix, *_ in stored.values()}, \
        f"files without a row: {sorted(folders - {p for p, *_ in stored.values()})}"
    partial = [str(p) for p in images.rglob("*.partial-*")] if images.exists() else []
    assert not partial, f"half-written files left: {partial}"
    return stored
