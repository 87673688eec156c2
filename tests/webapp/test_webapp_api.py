"""The web app's JSON API and pages, on SQLite + a local image folder and on a real PostgreSQL 15 + S3
(moto_server), in front of the real serving stack (``web_stack``: predictor + transformer processes).

Every route, every bad input of the issue, authentication and authorisation. The app runs in-process
(FastAPI's TestClient, lifespan and retry worker included); the process-level behaviour (restart,
streaming limit, the real stack going down) is in test_webapp_stack.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from webapp_fixtures import (PHI, colour_photo_png, full_res_xrays, make_bucket, make_dicom, pneumoscope,
                             s3_environment)

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
MAX_UPLOAD = 4 * 1024 * 1024


@dataclass
class Backend:
    name: str
    app: object
    client: TestClient  # unauthenticated
    settings: object
    tokens: dict
    env: dict

    @property
    def ctx(self):
        return self.app.state.ctx

    def new_client(self, **kwargs) -> TestClient:
        """Another client on the SAME event loop as the app's lifespan (its HTTP pool lives there)."""
        client = TestClient(self.app, **kwargs)
        client.portal = self.client.portal
        return client

    def api(self, user: str) -> TestClient:
        client = self.new_client()
        client.headers["authorization"] = f"Bearer {self.tokens[user]}"
        return client

    def count_studies(self) -> int:
        from webapp.models import Study

        with self.ctx.factory() as db:
            return db.scalar(select(func.count()).select_from(Study))

    def stored_files(self) -> set[str]:
        store = self.ctx.store
        return set(store.fs.find(store.root)) if store.fs.exists(store.root) else set()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request, tmp_path_factory, web_stack):
    from webapp import accounts
    from webapp.app import create_app
    from webapp.db import transaction
    from webapp.settings import WebSettings

    root = tmp_path_factory.mktemp(f"web-{request.param}")
    env: dict = {}
    if request.param == "sqlite":
        database, images = f"sqlite:///{root / 'web.db'}", str(root / "images")
    else:
        database = request.getfixturevalue("postgres").create_database("api_tests")
        endpoint = request.getfixturevalue("moto_endpoint")
        env = s3_environment(endpoint)
        make_bucket(endpoint, "studies")
        images = "s3://studies/api"
    settings = WebSettings(home=root, database_url=database, image_store=images, inference_url=web_stack.rest,
                           secret_key="test-secret", max_upload_bytes=MAX_UPLOAD, login_max_failures_per_user=3,
                           login_max_failures_per_client=50, retry_initial_s=0.3, retry_max_s=1, worker_poll_s=0.2,
                           inline_wait_s=30)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        if env:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
        app = create_app(settings)
        with TestClient(app) as client:
            tokens = {}
            with transaction(app.state.ctx.factory) as db:
                for name, admin in (("alice", False), ("bob", False), ("chief", True)):
                    accounts.add_user(db, name, PASSWORD, admin=admin)
            with transaction(app.state.ctx.factory) as db:
                for name in ("alice", "bob", "chief"):
                    tokens[name] = accounts.issue_token(db, name, "tests")[0]
            yield Backend(request.param, app, client, settings, tokens, {**env, "PNEUMOSCOPE_DATABASE_URL": database,
                                                                          "PNEUMOSCOPE_IMAGE_STORE": images,
                                                                          "PNEUMOSCOPE_HOME": str(root)})


@pytest.fixture(scope="module")
def xrays() -> list[Path]:
    return full_res_xrays(4)


@pytest.fixture(scope="module")
def scored(backend, xrays):
    """One study of alice's, uploaded with the API and scored by the real transformer."""
    response = backend.api("alice").post("/api/studies", files={"file": (xrays[0].name, xrays[0].read_bytes(),
                                                                         "image/jpeg")},
                                         data={"note": "left lower lobe, follow-up"})
    assert response.status_code == 201, response.text
    return response.json()


def login(backend: Backend, user: str, password: str = PASSWORD, base_url: str = "http://testserver") -> TestClient:
    client = backend.new_client(base_url=base_url, follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = client.post("/login", data={"username": user, "password": password, "csrf_token": token,
                                           "next": "/"})
    assert response.status_code == 303, response.text
    return client


def csrf_of(client: TestClient, path: str = "/") -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).text).group(1)


def pdf_text(pdf: bytes) -> str:
    """The text a reader sees in a PDF, every page (pypdf, through the embedded fonts' Unicode maps)."""
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def metric(backend: Backend, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(backend.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


# -- health, metrics, OpenAPI --------------------------------------------------------------------------

def test_probes_and_metrics_need_no_sign_in(backend):
    assert backend.client.get("/healthz").json() == {"status": "ok"}
    ready = backend.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = backend.client.get("/metrics")
    assert metrics.status_code == 200
    for name in ("pneumoscope_web_requests_total", "pneumoscope_web_request_seconds", "pneumoscope_web_uploads_total",
                 "pneumoscope_web_pending_studies", "pneumoscope_web_inference_seconds"):
        assert name in metrics.text


def test_openapi_documents_every_api_route(backend):
    paths = backend.client.get("/openapi.json").json()["paths"]
    assert set(paths["/api/studies"]) == {"get", "post"}
    for sub in ("", "/image", "/heatmap", "/report"):
        assert "get" in paths[f"/api/studies/{{study_id}}{sub}"]
    assert "post" in paths["/api/studies/{study_id}/feedback"]


PROTECTED = [("GET", "/api/studies"), ("POST", "/api/studies"), ("GET", "/api/studies/1"),
             ("GET", "/api/studies/1/image"), ("GET", "/api/studies/1/heatmap"), ("GET", "/api/studies/1/report"),
             ("POST", "/api/studies/1/feedback")]
PAGES = ["/", "/studies", "/studies/1", "/studies/1/report"]


def test_every_route_but_the_probes_needs_a_user(backend):
    for method, path in PROTECTED:
        response = backend.client.request(method, path)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["code"] == "not_authenticated" and response.headers["www-authenticate"] == "Bearer"
    anonymous = backend.new_client(follow_redirects=False)
    for path in PAGES:
        response = anonymous.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?reason=signin")
    for method, path in (("POST", "/studies"), ("POST", "/studies/1/feedback"), ("POST", "/logout")):
        assert anonymous.request(method, path).status_code == 303


# -- upload and read back ----------------------------------------------------------------------------------

def test_upload_returns_the_result_and_every_route_reads_it_back(backend, scored, xrays):
    result = scored["result"]
    assert scored["status"] == "done" and scored["image_format"] == "jpeg"
    assert 0.0 <= result["probability"] <= 1.0 and result["label"] in ("NORMAL", "PNEUMONIA")
    assert result["label"] == ("PNEUMONIA" if result["probability"] >= result["threshold"] else "NORMAL")
    assert result["model_name"] == "pneumonia" and result["model_version"] == "local"
    alice = backend.api("alice")
    study_id = scored["id"]
    assert alice.get(f"/api/studies/{study_id}").json() == {**scored, "attempts": scored["attempts"]}
    image = alice.get(f"/api/studies/{study_id}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    from webapp.uploads import strip_jpeg_metadata

    # a JPEG is stored as uploaded, less its metadata segments (this film carries an EXIF APP1)
    assert image.content == strip_jpeg_metadata(xrays[0].read_bytes()) != xrays[0].read_bytes()
    heatmap = alice.get(f"/api/studies/{study_id}/heatmap")
    assert heatmap.headers["content-type"] == "image/png" and heatmap.content.startswith(b"\x89PNG")
    report = alice.get(f"/api/studies/{study_id}/report")
    assert report.headers["content-type"] == "application/pdf" and report.content.startswith(b"%PDF")
    text = pdf_text(report.content)
    assert f"{result['probability'] * 100:.1f} %" in text and "version local" in text
    assert "does not replace" in text
    listing = alice.get("/api/studies").json()
    assert listing["total"] >= 1 and study_id in [s["id"] for s in listing["items"]]
    assert all("owner" not in s for s in listing["items"])
    assert alice.get(f"/api/studies/{study_id}").headers["cache-control"] == "no-store"


def test_upload_counts_in_metrics(backend, xrays):
    before = metric(backend, "pneumoscope_web_uploads_total", outcome="scored")
    response = backend.api("bob").post("/api/studies", files={"file": ("x.jpeg", xrays[1].read_bytes())})
    assert response.status_code == 201
    assert metric(backend, "pneumoscope_web_uploads_total", outcome="scored") == before + 1
    assert metric(backend, "pneumoscope_web_inference_seconds_count", outcome="ok") >= 1
    assert metric(backend, "pneumoscope_web_requests_total", route="/api/studies", method="POST", status="201") >= 1


def test_a_png_upload_is_scored(backend, xrays):
    from PIL import Image

    out = io.BytesIO()
    with Image.open(xrays[1]) as image:
        image.convert("L").save(out, format="PNG")
    response = backend.api("alice").post("/api/studies", files={"file": ("scan.png", out.getvalue(), "image/png")})
    assert response.status_code == 201, response.text
    assert response.json()["image_format"] == "png" and response.json()["status"] == "done"


def test_dicom_is_deidentified_before_it_is_stored(backend):
    dicom = make_dicom()
    alice = backend.api("alice")
    response = alice.post("/api/studies", files={"file": ("Doe_Jane.dcm", dicom, "application/dicom")})
    assert response.status_code == 201, response.text
    study = response.json()
    assert study["image_format"] == "dicom" and study["deidentified"] is True and study["status"] == "done"
    stored = alice.get(f"/api/studies/{study['id']}/image").content
    ds = pydicom.dcmread(io.BytesIO(stored))
    for key, value in PHI.items():
        assert str(ds.get(key, "")) in ("", "ANONYMIZED", "00010101"), (key, ds.get(key))
        assert value.encode() not in stored, key
    assert b"Doe^Jane" not in stored and b"ACME SCANNER" not in stored  # private tags are gone too
    assert ds.PatientIdentityRemoved == "YES" and "PixelData" in ds
    assert ds.StudyDate != "20240301"
    display = alice.get(f"/api/studies/{study['id']}/image", params={"variant": "display"})
    assert display.headers["content-type"] == "image/png"
    # the row holds nothing from the header either (no file name: "Doe_Jane.dcm")
    from webapp.models import Study

    with backend.ctx.factory() as db:
        row = db.get(Study, study["id"])
        values = json.dumps({c.name: str(getattr(row, c.name)) for c in Study.__table__.columns})
    assert "Doe" not in values and "MRN" not in values and "Springfield" not in values


def _with_age(dicom: bytes, age: str) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(dicom))
    dataset.PatientAge = age
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_the_decision_fields_are_stored_and_served(backend, xrays):
    response = backend.api("alice").post("/api/studies", files={"file": ("chest.jpeg", xrays[0].read_bytes(),
                                                                            "image/jpeg")})
    assert response.status_code == 201, response.text
    result = response.json()["result"]
    assert result["decision"] in ("PNEUMONIA", "NORMAL", "REFER") and isinstance(result["in_intended_use"], bool)
    assert isinstance(result["ood_score"], float) and isinstance(result["refer_reasons"], list)
    assert (result["decision"] == "REFER") == bool(result["refer_reasons"])
    assert result["decision"] in (result["label"], "REFER")  # the label keeps its meaning beside the decision
    assert result["model_info"]["profile"] == "test" and result["model_info"]["demonstration"] is False
    page = backend.api("alice").get(f"/studies/{response.json()['id']}/report")
    assert page.status_code == 200 and "Intended use" in page.text


def test_a_dicom_age_over_the_limit_is_read_before_deidentification_and_refers(backend):
    alice = backend.api("alice")
    old = alice.post("/api/studies", files={"file": ("a.dcm", _with_age(make_dicom(), "045Y"), "application/dicom")})
    young = alice.post("/api/studies", files={"file": ("b.dcm", _with_age(make_dicom(), "004Y"), "application/dicom")})
    assert old.status_code == young.status_code == 201, (old.text, young.text)
    over, child = old.json()["result"], young.json()["result"]
    assert over["decision"] == "REFER" and over["in_intended_use"] is False
    assert "age_over_limit" in [r["code"] for r in over["refer_reasons"]]
    assert "age_over_limit" not in [r["code"] for r in child["refer_reasons"]]
    assert over["probability"] == child["probability"]  # the same film: only the age differs
    # the stored file lost the age with the rest of the header; the row keeps it encrypted, for a retry
    stored = alice.get(f"/api/studies/{old.json()['id']}/image").content
    assert "PatientAge" not in pydicom.dcmread(io.BytesIO(stored)) and b"045Y" not in stored
    from webapp.models import Study

    with backend.ctx.factory() as db:
        row = db.get(Study, old.json()["id"])
        token = row.patient_age_token
    assert token.startswith("gAAAAA") and backend.ctx.service.cipher.decrypt(token) == 45.0  # a Fernet token
    rescored = backend.client.portal.call(backend.ctx.service.score, old.json()["id"], 60.0)
    assert rescored.outcome == "scored" and rescored.study.decision == "REFER"
    assert "age_over_limit" in [r["code"] for r in rescored.study.refer_reasons]
    age_reason = next(r for r in over["refer_reasons"] if r["code"] == "age_over_limit")
    assert "45" not in age_reason["text"]  # the age is not repeated in the answer


def _xray_with_metadata(source: Path, image_format: str) -> bytes:
    """The X-ray re-saved with identifying text where cameras and PACS exports put it."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out = io.BytesIO()
    with Image.open(source) as image:
        gray = image.convert("L")
        if image_format == "png":
            info = PngInfo()
            info.add_text("Patient", "Doe^Jane")
            info.add_itxt("Comment", "MRN-445566 Springfield General Hospital", zip=True)
            gray.save(out, format="PNG", pnginfo=info)
            return out.getvalue()
        exif = Image.Exif()
        exif[0x013B] = "Doe^Jane"  # Artist
        exif[0x010E] = "MRN-445566 chest PA"  # ImageDescription
        gray.save(out, format="JPEG", quality=92, exif=exif, comment=b"Springfield General Hospital")
    data = out.getvalue()
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><dc:creator>House^Gregory</dc:creator></x:xmpmeta>"
    return data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:]


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_jpeg_and_png_metadata_is_removed_losslessly_before_storage(backend, xrays, image_format):
    import numpy as np
    from PIL import Image

    original = _xray_with_metadata(xrays[0], image_format)
    assert b"Doe^Jane" in original or image_format == "png"  # the PNG's iTXt is compressed
    alice = backend.api("alice")
    response = alice.post("/api/studies", files={"file": (f"Doe_Jane.{image_format}", original)})
    assert response.status_code == 201, response.text
    study = response.json()
    assert study["deidentified"] is True and study["status"] == "done"
    stored = alice.get(f"/api/studies/{study['id']}/image").content
    for text in (b"Doe^Jane", b"MRN-445566", b"Springfield", b"House^Gregory", b"Exif", b"tEXt", b"iTXt"):
        assert text not in stored, text
    with Image.open(io.BytesIO(original)) as before, Image.open(io.BytesIO(stored)) as after:
        assert not after.info.get("exif") and not getattr(after, "text", {})
        assert np.array_equal(np.asarray(before), np.asarray(after))  # the pixels are untouched


def test_malformed_segments_are_refused_rather_than_stored_with_metadata():
    from webapp.uploads import UploadRejected, strip_jpeg_metadata, strip_png_metadata

    for strip, data in ((strip_jpeg_metadata, b"\xff\xd8\xff\xe1\x00\x40Exif\x00\x00Doe^Jane"),
                        (strip_jpeg_metadata, b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"),
                        (strip_png_metadata, b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00")):
        with pytest.raises(UploadRejected) as refused:
            strip(data)
        assert refused.value.status == 422 and "metadata cannot be removed" in str(refused.value)


def test_bad_uploads_get_a_clear_4xx_and_leave_nothing_behind(backend):
    alice = backend.api("alice")
    studies, files = backend.count_studies(), backend.stored_files()
    cases = [
        ("empty", b"", 400, "empty"),
        ("text", b"patient notes, not an image\n" * 10, 415, "not a JPEG, PNG or DICOM"),
        ("truncated jpeg", b"\xff\xd8\xff\xe0" + b"\x00" * 50, 422, "cannot be read"),
        ("dicom without pixels", make_dicom(pixels=False), 422, "no pixel data"),
        ("colour photograph", colour_photo_png(), 422, "not accepted for analysis"),
        ("too large", b"\xff\xd8\xff" + os.urandom(MAX_UPLOAD + 1), 413, "larger than the limit"),
    ]
    for name, data, status, message in cases:
        response = alice.post("/api/studies", files={"file": ("upload.bin", data)})
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["error"], (name, response.json())
    gate = alice.post("/api/studies", files={"file": ("photo.png", colour_photo_png())}).json()["error"]
    assert "colour" in gate.lower(), gate  # the transformer's own message reaches the doctor
    no_file = alice.post("/api/studies", files={"note": (None, "no file")})
    assert no_file.status_code == 400 and "multipart field 'file'" in no_file.json()["error"]
    for body in ({"data": {"note": "a form without a file"}},
                 {"content": b"raw", "headers": {"content-type": "image/jpeg"}}):
        response = alice.post("/api/studies", **body)
        assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]
    assert backend.count_studies() == studies and backend.stored_files() == files
    assert metric(backend, "pneumoscope_web_uploads_total", outcome="rejected_by_model") >= 2
    assert metric(backend, "pneumoscope_web_uploads_total", outcome="too_large") >= 1


def test_an_oversized_upload_is_refused_from_its_declared_length(backend):
    body = b"--x\r\n" + b"\0" * 16
    response = backend.api("alice").post("/api/studies", content=body, headers={
        "content-type": "multipart/form-data; boundary=x", "content-length": str(MAX_UPLOAD * 2)})
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]


# -- authentication ------------------------------------------------------------------------------------------

def test_session_cookie_flags_and_secure_over_https(backend):
    client = backend.new_client(follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token})
    cookie = response.headers["set-cookie"]
    assert "pneumoscope_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie
    secure = backend.new_client(base_url="https://testserver", follow_redirects=False)
    page = secure.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = secure.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303 and "Secure" in response.headers["set-cookie"]


def test_wrong_password_and_rate_limits(backend):
    client = backend.new_client(follow_redirects=False)

    def attempt(user, password):
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        return client.post("/login", data={"username": user, "password": password, "csrf_token": token})

    wrong = attempt("bob", "not his password")
    assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text
    assert attempt("nobody", "whatever-password").status_code == 401  # same answer for unknown users
    for _ in range(2):
        attempt("bob", "still wrong")
    blocked = attempt("bob", PASSWORD)  # three failures: even the right password waits
    assert blocked.status_code == 429 and "Too many failed sign-ins" in blocked.text
    assert attempt("alice", PASSWORD).status_code == 303  # other users are not affected
    from webapp.models import LoginAttempt, utcnow

    with backend.ctx.factory() as db:  # the window passes
        db.execute(update(LoginAttempt).values(at=utcnow() - timedelta(hours=1)))
        db.commit()
    assert attempt("bob", PASSWORD).status_code == 303


def test_rate_limit_per_client_address(backend):
    from webapp import accounts
    from webapp.models import LoginAttempt

    with backend.ctx.factory() as db:
        for i in range(backend.settings.login_max_failures_per_client):
            accounts.record_failure(db, f"guess{i}", "testclient")
        db.commit()
    try:
        client = backend.new_client(follow_redirects=False)
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        response = client.post("/login", data={"username": "chief", "password": PASSWORD, "csrf_token": token})
        assert response.status_code == 429
    finally:
        with backend.ctx.factory() as db:
            db.execute(LoginAttempt.__table__.delete())
            db.commit()


def test_login_needs_its_csrf_token(backend):
    client = backend.new_client(follow_redirects=False)
    client.get("/login")
    missing = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert missing.status_code == 403 and "CSRF" in missing.text
    forged = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": "forged.token"})
    assert forged.status_code == 403


def test_expired_session_sends_the_doctor_back_to_sign_in(backend):
    from webapp.models import WebSession, utcnow

    client = login(backend, "alice")
    assert client.get("/").status_code == 200
    with backend.ctx.factory() as db:
        db.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.commit()
    page = client.get("/studies")
    assert page.status_code == 303 and page.headers["location"].startswith("/login?reason=expired")
    assert "session has expired" in client.get(page.headers["location"]).text
    api = client.get("/api/studies")
    assert api.status_code == 401 and "expired" in api.json()["error"]


def test_forms_and_session_writes_need_the_csrf_token(backend, scored, xrays):
    client = login(backend, "alice")
    study = scored["id"]
    for data in ({"verdict": "confirmed"}, {"verdict": "confirmed", "csrf_token": "wrong"}):
        response = client.post(f"/studies/{study}/feedback", data=data)
        assert response.status_code == 403 and "CSRF token" in response.text
    upload = client.post("/api/studies", files={"file": ("x.jpeg", xrays[2].read_bytes())})
    assert upload.status_code == 403 and upload.json()["code"] == "csrf"
    assert client.post("/logout").status_code == 403
    page_upload = client.post("/studies", files={"file": ("x.jpeg", xrays[2].read_bytes())},
                              data={"csrf_token": "wrong"})
    assert page_upload.status_code == 403
    token = csrf_of(client)
    ok = client.post("/api/studies", files={"file": ("x.jpeg", xrays[2].read_bytes())},
                     headers={"x-csrf-token": token})
    assert ok.status_code == 201


def test_page_upload_and_sign_out(backend, xrays):
    client = login(backend, "bob")
    token = csrf_of(client)
    response = client.post("/studies", files={"file": ("x.jpeg", xrays[3].read_bytes(), "image/jpeg")},
                           data={"csrf_token": token, "note": "form upload"})
    assert response.status_code == 303 and re.fullmatch(r"/studies/\d+", response.headers["location"])
    page = client.get(response.headers["location"])
    assert page.status_code == 200 and "Probability of pneumonia" in page.text and "version local" in page.text
    bad = client.post("/studies", files={"file": ("x.txt", b"hello", "text/plain")}, data={"csrf_token": token})
    assert bad.status_code == 415 and "not a JPEG, PNG or DICOM image" in bad.text
    out = client.post("/logout", data={"csrf_token": token})
    assert out.status_code == 303 and out.headers["location"] == "/login?reason=signed_out"
    assert client.get("/").status_code == 303


def test_api_tokens_bad_and_revoked(backend):
    from webapp import accounts
    from webapp.db import transaction

    anonymous = backend.new_client()
    for header in ("Bearer pns_not-a-token", "Basic YWxpY2U6cHc=", "Bearer "):
        response = anonymous.get("/api/studies", headers={"authorization": header})
        assert response.status_code == 401, header
    with transaction(backend.ctx.factory) as db:
        token, row = accounts.issue_token(db, "bob", "to revoke")
    assert anonymous.get("/api/studies", headers={"authorization": f"Bearer {token}"}).status_code == 200
    with transaction(backend.ctx.factory) as db:
        accounts.revoke_token(db, str(row.id))
    response = anonymous.get("/api/studies", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 401 and "revoked" in response.json()["error"]


# -- authorisation -------------------------------------------------------------------------------------------

def test_another_users_study_is_not_found(backend, scored):
    bob = backend.api("bob")
    study = scored["id"]
    for method, path in [(m, p.replace("/1", f"/{study}")) for m, p in PROTECTED if "/1" in p]:
        kwargs = {"json": {"verdict": "confirmed"}} if method == "POST" else {}
        response = bob.request(method, path, **kwargs)
        assert response.status_code == 404, (path, response.text)
        assert response.json() == {"error": f"study {study} not found", "code": "not_found"}
    assert bob.get("/api/studies/999999").json()["error"] == "study 999999 not found"  # same answer
    assert study not in [s["id"] for s in bob.get("/api/studies", params={"per_page": 100}).json()["items"]]
    page = login(backend, "bob").get(f"/studies/{study}")
    assert page.status_code == 404 and "Not found" in page.text


def test_an_admin_sees_every_study(backend, scored):
    chief = backend.api("chief")
    assert chief.get(f"/api/studies/{scored['id']}").json()["owner"] == "alice"
    everyone = chief.get("/api/studies", params={"per_page": 100}).json()["items"]
    assert {"alice", "bob"} <= {s["owner"] for s in everyone}
    only_bob = chief.get("/api/studies", params={"owner": "bob", "per_page": 100}).json()["items"]
    assert only_bob and all(s["owner"] == "bob" for s in only_bob)


# -- feedback, search, export --------------------------------------------------------------------------------

def test_feedback_confirm_and_correct(backend, scored):
    alice = backend.api("alice")
    study, label = scored["id"], scored["result"]["label"]
    other = "NORMAL" if label == "PNEUMONIA" else "PNEUMONIA"
    bad = [({"verdict": "maybe"}, 422), ({"verdict": "corrected"}, 400),
           ({"verdict": "corrected", "label": label}, 400), ({"verdict": "confirmed", "label": other}, 400),
           ({"verdict": "corrected", "label": "CAT"}, 422), ({"verdict": "confirmed", "note": "x" * 2001}, 422)]
    for body, status in bad:
        response = alice.post(f"/api/studies/{study}/feedback", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]
    confirmed = alice.post(f"/api/studies/{study}/feedback", json={"verdict": "confirmed"}).json()
    assert confirmed["feedback"]["verdict"] == "confirmed" and confirmed["feedback"]["label"] == label
    assert confirmed["note"] == "left lower lobe, follow-up"  # no note given: kept
    corrected = alice.post(f"/api/studies/{study}/feedback",
                           json={"verdict": "corrected", "label": other, "note": "Reviewed: consolidation"}).json()
    assert corrected["feedback"] == {"verdict": "corrected", "label": other, "at": corrected["feedback"]["at"]}
    assert corrected["note"] == "Reviewed: consolidation"


def test_feedback_needs_a_result(backend):
    from webapp.models import Study

    alice = backend.api("alice")
    study = alice.post("/api/studies", files={"file": ("x.jpeg", full_res_xrays(1, offset=5)[0].read_bytes())}).json()
    with backend.ctx.factory() as db:  # as if the transformer had not answered yet
        db.execute(update(Study).where(Study.id == study["id"]).values(status="pending", has_heatmap=False,
                                                                        next_attempt_at=None))
        db.commit()
    response = alice.post(f"/api/studies/{study['id']}/feedback", json={"verdict": "confirmed"})
    assert response.status_code == 409 and "no result yet" in response.json()["error"]
    assert alice.get(f"/api/studies/{study['id']}/heatmap").status_code == 409
    with backend.ctx.factory() as db:
        db.execute(update(Study).where(Study.id == study["id"]).values(status="done", has_heatmap=True))
        db.commit()


def test_search_by_note_decision_date_and_review(backend, scored):
    alice = backend.api("alice")
    hits = alice.get("/api/studies", params={"q": "CONSOLIDATION"}).json()
    assert [s["id"] for s in hits["items"]] == [scored["id"]]
    assert alice.get("/api/studies", params={"q": "100%_"}).json()["total"] == 0  # wildcards are literal
    label = scored["result"]["label"]
    by_label = alice.get("/api/studies", params={"label": label, "per_page": 100}).json()["items"]
    assert scored["id"] in [s["id"] for s in by_label] and all(s["result"]["label"] == label for s in by_label)
    corrected = alice.get("/api/studies", params={"feedback": "corrected"}).json()["items"]
    assert [s["id"] for s in corrected] == [scored["id"]]
    day = scored["created_at"][:10]
    assert alice.get("/api/studies", params={"from": day, "to": day}).json()["total"] >= 1
    assert alice.get("/api/studies", params={"to": "2000-01-01"}).json()["total"] == 0
    page = alice.get("/api/studies", params={"per_page": 1, "page": 2}).json()
    assert page["per_page"] == 1 and page["page"] == 2 and len(page["items"]) == 1 and page["pages"] == page["total"]
    bad = alice.get("/api/studies", params={"from": "yesterday"})
    assert bad.status_code == 422 and "from" in bad.json()["error"]
    html = login(backend, "alice").get("/studies", params={"q": "consolidation"})
    assert html.status_code == 200 and f"/studies/{scored['id']}" in html.text and "1 study found" in html.text
    assert login(backend, "alice").get("/studies", params={"from": "soon"}).status_code == 400


def test_study_page_report_page_and_review_form(backend, scored):
    client = login(backend, "alice")
    page = client.get(f"/studies/{scored['id']}")
    assert page.status_code == 200
    for text in ("Heatmap (H)", "Opacity", "Probability of pneumonia", "Write the report", "Keyboard shortcuts",
                 "does not replace"):
        assert text in page.text
    report = client.get(f"/studies/{scored['id']}/report")
    assert report.status_code == 200 and "Print" in report.text and "version local" in report.text
    token = csrf_of(client)
    saved = client.post(f"/studies/{scored['id']}/feedback", data={"verdict": "confirmed", "csrf_token": token,
                                                                  "note": "agreed"})
    assert saved.status_code == 303 and "saved=1" in saved.headers["location"]
    assert "Your review was saved." in client.get(saved.headers["location"]).text
    wrong = client.post(f"/studies/{scored['id']}/feedback", data={"verdict": "corrected", "csrf_token": token})
    assert wrong.status_code == 400 and "needs the right label" in wrong.text


def test_export_writes_reviewed_studies_in_the_kaggle_layout(backend, scored, tmp_path):
    from model.data import discover

    alice = backend.api("alice")
    label = scored["result"]["label"]
    other = "NORMAL" if label == "PNEUMONIA" else "PNEUMONIA"
    alice.post(f"/api/studies/{scored['id']}/feedback", json={"verdict": "corrected", "label": other})
    done = pneumoscope("studies", "export", str(tmp_path / "export"), "--only-corrected", env=backend.env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["exported"] >= 1
    exported = tmp_path / "export" / "train" / other / f"pneumoscope-study-{scored['id']}.jpg"
    original = backend.api("alice").get(f"/api/studies/{scored['id']}/image").content
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == hashlib.sha256(original).hexdigest()
    manifest = json.loads((tmp_path / "export" / "pneumoscope-export.json").read_text())["studies"]
    entry = next(m for m in manifest if m["study"] == scored["id"])
    assert entry["review"] == "corrected" and entry["label"] == other and entry["model_label"] == label
    if summary["NORMAL"] and summary["PNEUMONIA"]:
        _, _, images = discover(str(tmp_path / "export"))  # the training ingest reads the export as it is
        assert len(images) == summary["exported"]


def test_readyz_is_503_for_a_database_without_the_schema(backend, tmp_path):
    from webapp.db import check_ready, make_engine

    ready, why = check_ready(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    assert not ready and "schema" in why
    with contextlib.suppress(Exception):
        ready, why = check_ready(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    assert not ready and "unreachable" in why


def test_the_transformers_quality_flags_are_kept_when_it_sends_them():
    """The v2 answer as the transformer sends it once it reports image quality (a JSON list per image)."""
    from webapp.inference import _parse
    from webapp.models import Study
    from webapp.report import quality_warnings

    reply = {"model_name": "pneumonia", "model_version": "7", "outputs": [
        {"name": "probability", "datatype": "FP32", "shape": [1], "data": [0.81]},
        {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["PNEUMONIA"]},
        {"name": "threshold", "datatype": "FP32", "shape": [1], "data": [0.5]},
        {"name": "quality_flags", "datatype": "BYTES", "shape": [1], "data": ['["blurred", "text_overlay"]']}]}
    result = _parse(reply, 0.1)
    assert result.quality_flags == ["blurred", "text_overlay"] and result.model_version == "7"
    assert result.heatmap_png is None and result.label == "PNEUMONIA"
    # an older transformer's "text_overlay" was a side marker more often than not: no longer shown as a warning
    assert quality_warnings(Study(quality_flags=result.quality_flags)) == ["blurred"]
    without = _parse({**reply, "outputs": reply["outputs"][:3]}, 0.1)
    assert without.quality_flags is None
    with pytest.raises(ValueError):
        _parse({**reply, "outputs": [{**reply["outputs"][0], "data": [1.5]}] + reply["outputs"][1:]}, 0.1)


def test_an_empty_secret_file_left_by_a_crash_is_replaced_not_used(tmp_path):
    """The signing key lives in $PNEUMOSCOPE_HOME/webapp-secret; a process that died between creating and
    writing it left an empty file, and every later start signed sessions with an empty key."""
    from webapp.settings import WebSettings

    settings = WebSettings(home=tmp_path, secret_key=None)
    (tmp_path / "webapp-secret").write_text("")
    key = settings.resolved_secret_key()
    assert len(key) >= 32 and (tmp_path / "webapp-secret").read_text().strip() == key
    assert (tmp_path / "webapp-secret").stat().st_mode & 0o077 == 0  # readable by its owner only
    assert settings.resolved_secret_key() == key  # kept from then on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp-secret"]  # no temporary file left
