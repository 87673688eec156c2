"""No PHI anywhere: `make demo`'s stack (a model registered in a real MLflow tracking server, `pneumoscope serve
--model models:/pneumonia/1` with its web app on PostgreSQL) plus a second web app on SQLite, a browser session
(Chromium) and API uploads of films whose identifying fields hold unique marker strings: a DICOM file (patient
name, id, birth date, accession number, institution, a private tag), a JPEG with EXIF and a PNG with text chunks,
all under file names made of markers. Then every log, every database row (SQLite's file, PostgreSQL's dump and
its data folder), every stored file, the MLflow server's store, artifacts and log, and every Prometheus label of
every process is searched for the markers: 0 hits.

The search is checked to find them: the uploaded files themselves, searched the same way, hold every marker.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from mlflow_server import MlflowServer
from webapp_fixtures import (CHROMIUM, CHROMIUM_FLAGS, PASSWORD, PG_BIN, VENV_BIN, _as_pg_user, api_token,
                             full_res_xrays, make_dicom, pneumoscope, start_web, stop)

pytestmark = pytest.mark.integration

#: Unique strings in every identifying field (none occurs by chance in an image, a log or a database).
MARKERS = {"name": "Zyxqvist", "patient_id": "MRN-ZQX-77123", "birth_date": "19310117",
           "accession": "ACC-ZQX-99881", "institution": "Qwzvell Infirmary"}
PHI = {"PatientName": f"{MARKERS['name']}^Helga", "PatientID": MARKERS["patient_id"],
       "PatientBirthDate": MARKERS["birth_date"], "AccessionNumber": MARKERS["accession"],
       "InstitutionName": MARKERS["institution"], "OtherPatientIDs": MARKERS["patient_id"],
       "ReferringPhysicianName": f"{MARKERS['name']}^Referrer"}
FILE_NAME = f"{MARKERS['name']}_{MARKERS['patient_id']}_{MARKERS['birth_date']}"


def find_markers(data: bytes) -> set[str]:
    """The markers in ``data``, as UTF-8 or UTF-16 text, in any letter case."""
    low = data.lower()
    found = set()
    for key, marker in MARKERS.items():
        for encoded in (marker.lower().encode(), marker.lower().encode("utf-16-le")):
            if encoded in low:
                found.add(key)
    return found


def search(paths: list[Path]) -> dict[str, set[str]]:
    hits = {}
    for root in paths:
        for path in ([root] if root.is_file() else root.rglob("*") if root.is_dir() else []):
            if path.is_file() and not path.is_symlink():
                found = find_markers(path.read_bytes())
                if found:
                    hits[str(path)] = found
    return hits


def films(source: Path) -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, media type)}: the DICOM, a JPEG with EXIF and a PNG with text chunks, all marked."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    dicom = make_dicom(source, phi=PHI)
    with Image.open(source) as image:
        gray = image.convert("L")
        exif = Image.Exif()
        exif[0x010E] = f"{PHI['PatientName']} {MARKERS['accession']}"  # ImageDescription
        exif[0x013B] = MARKERS["institution"]  # Artist
        jpeg = io.BytesIO()
        gray.save(jpeg, format="JPEG", quality=90, exif=exif.tobytes(),
                  comment=f"patient {MARKERS['patient_id']} born {MARKERS['birth_date']}".encode())
        text = PngInfo()
        for key, value in PHI.items():
            text.add_text(key, value)
        png = io.BytesIO()
        gray.save(png, format="PNG", pnginfo=text)
    return {f"{FILE_NAME}.dcm": (dicom, "application/dicom"), f"{FILE_NAME}.jpeg": (jpeg.getvalue(), "image/jpeg"),
            f"{FILE_NAME}.png": (png.getvalue(), "image/png")}


def metrics_text(urls: list[str]) -> bytes:
    return b"".join(httpx.get(f"{url}/metrics", timeout=30).content for url in urls)


def test_no_marker_of_the_patient_reaches_a_log_a_row_a_file_an_artifact_or_a_label(tmp_path, web_stack, postgres,
                                                                                     tiny_model):
    from model.registry import log_and_register

    source = full_res_xrays(1, offset=50)[0]
    uploads = films(source)
    originals = tmp_path / "originals"
    originals.mkdir()
    for name, (data, _) in uploads.items():
        (originals / name.replace(MARKERS["name"], "x")).write_bytes(data)
    assert {key for hits in search([originals]).values() for key in hits} == set(MARKERS), \
        "the search must find every marker in what was uploaded"

    # -- the stack: a model in a real MLflow server, served from it, with its web app on PostgreSQL ------------
    mlflow_root = tmp_path / "mlflow"
    mlflow_root.mkdir()
    server = MlflowServer(f"sqlite:///{mlflow_root / 'mlflow.db'}", str(mlflow_root / "artifacts"),
                          mlflow_root / "server.log").start()
    home, sqlite_home = tmp_path / "home", tmp_path / "sqlite-home"
    database = postgres.create_database("no_phi")
    env = {"PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_DATABASE_URL": database, "MLFLOW_TRACKING_URI": server.url,
           "PNEUMOSCOPE_SECRET_KEY": "no-phi", "PNEUMOSCOPE_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    stack, web = None, None
    try:
        log_and_register(web_stack.root / "bundle", tiny_model.report, [{"epoch": 1, "train_loss": 0.7}],
                         {"profile": "smoke"}, tracking_uri=server.url, model_name="pneumonia",
                         plots_dir=tiny_model.eval_dir / "plots", promotion="always")
        made = pneumoscope("users", "add", "doctor", "--password-stdin", env=env, stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
        from serving.stack import free_port

        port = free_port()
        stack = subprocess.Popen([str(VENV_BIN / "pneumoscope"), "serve", "--model", "models:/pneumonia/1",
                                  "--port", str(port), "--web-port", str(free_port({port, port + 1})),
                                  "--log-file", str(tmp_path / "stack.log")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                 env={**os.environ, **env})
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in stack.stdout], daemon=True).start()
        ready = lines.get(timeout=300)
        assert ready.startswith("READY "), (ready, (tmp_path / "stack.log").read_text()[-3000:])
        info = json.loads(ready[len("READY "):])
        sqlite_env = {"PNEUMOSCOPE_HOME": str(sqlite_home), "PNEUMOSCOPE_SECRET_KEY": "no-phi-sqlite",
                      "PNEUMOSCOPE_INFERENCE_URL": info["rest"]}
        web = start_web(sqlite_env, tmp_path / "web-sqlite.log")

        # -- a browser session on the stack's web app: sign in, upload the DICOM, read, report, review ---------
        browse(info["web"], originals, uploads)

        # -- the API on the SQLite web app: every film, then the training export --------------------------------
        token = api_token(sqlite_env, "doctor", PASSWORD)
        api = httpx.Client(base_url=web.url, headers={"authorization": f"Bearer {token}"}, timeout=120)
        for name, (data, media_type) in uploads.items():
            response = api.post("/api/studies", files={"file": (name, data, media_type)})
            assert response.status_code in (201, 202), response.text
            study = response.json()["id"]
            for path in ("", "/image", "/image?variant=display", "/report"):
                assert api.get(f"/api/studies/{study}{path}").status_code == 200
            result = api.get(f"/api/studies/{study}").json()["result"]
            review = ({"verdict": "corrected", "label": result["label"]} if (result or {}).get("decision") == "REFER"
                      else {"verdict": "confirmed"})  # a referred film is reviewed by the doctor's reading
            assert api.post(f"/api/studies/{study}/feedback", json=review).status_code == 200
        exported = pneumoscope("studies", "export", str(tmp_path / "export"), env=sqlite_env)
        assert exported.returncode == 0, exported.stderr

        labels = metrics_text([info["web"], web.url, info["rest"], info["predictor_rest"]])
        assert b"pneumoscope_web_uploads_total" in labels and b"request" in labels
        dump = subprocess.run(_as_pg_user([str(PG_BIN / "pg_dump"), "-h", "127.0.0.1", "-p", str(postgres.port),
                                           "-U", "postgres", "--data-only", "no_phi"]),
                              capture_output=True, timeout=120)
        assert dump.returncode == 0 and b"COPY public.studies" in dump.stdout, dump.stderr[-500:]
    finally:
        if web is not None:
            web.stop()
        if stack is not None:
            stop(stack, 60)
        server.stop()
    (tmp_path / "pg_dump.sql").write_bytes(dump.stdout)
    (tmp_path / "metrics.txt").write_bytes(labels)
    searched = [home, sqlite_home, mlflow_root, tmp_path / "export", tmp_path / "stack.log",
                tmp_path / "web-sqlite.log", tmp_path / "pg_dump.sql", tmp_path / "metrics.txt", postgres.log,
                postgres.data]
    assert (sqlite_home / "webapp.db").is_file() and list((home / "studies").iterdir())
    assert list((tmp_path / "export" / "train").rglob("*.dcm")), "the DICOM study was exported"
    hits = search(searched)
    assert not hits, f"PHI markers found: {json.dumps({k: sorted(v) for k, v in hits.items()}, indent=1)}"


def browse(web: str, originals: Path, uploads: dict) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run `make deps-web` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    dicom_name = next(name for name in uploads if name.endswith(".dcm"))
    marked = originals.parent / "browser" / dicom_name  # the browser sends the marked file name
    marked.parent.mkdir()
    marked.write_bytes(uploads[dicom_name][0])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context().new_page()
            page.goto(f"{web}/login")
            page.fill("#username", "doctor")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{web}/")
            page.set_input_files("#file", str(marked))
            page.click("#upload-button")
            page.wait_for_url(re.compile(r".*/studies/\d+$"), timeout=120_000)
            page.wait_for_selector("#state-done", state="visible", timeout=120_000)
            study_url = page.url
            # the study page's link to the printable report ("Write the report" until it is signed)
            page.click(f"a[href='{urlparse(study_url).path}/report']")
            page.wait_for_selector("#print-button")
            page.goto(study_url)
            if page.query_selector("#refer-review") is None:
                page.check("#verdict-confirmed")
            else:  # a REFER page asks for the doctor's reading
                page.select_option("#correct-label", "NORMAL")
            page.click("text=Save review")
            page.wait_for_selector("text=Your review was saved.")
            page.goto(f"{web}/studies")
            assert page.locator("table.studies tbody tr").count() >= 1
        finally:
            browser.close()
