"""The reading room's API (issue 16): the decision and its reasons, the CAM and its lung share, the patient fields
encrypted at rest, the DICOM display copy, the worklist's triage order, and the report's versions and PDF; the
migration that adds them, up and down, on SQLite and PostgreSQL.

The app runs in-process (FastAPI's TestClient) in front of the real serving stack (``web_stack``), which answers
the decision, its reasons, the intended use and the model's description. Results with known values (a REFER and
its reasons, CAMs with known hot spots, a worklist's probabilities) replace the served answer through the storage
layer (``store_result``), exactly as the app stores an answer; the served fields themselves are checked on real
answers.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from webapp_fixtures import cam_grid, dicom_16bit, full_res_xrays, store_result

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
PATIENT = {"patient_ref": "MRN-7H3Q9Z", "accession": "ACC-55X1K7", "view": "AP",
           "clinical_question": "persistent fever, crackles right base"}
#: The values long enough to look for in raw bytes ("AP" turns up by chance in any binary file).
DISTINCT = [PATIENT[k] for k in ("patient_ref", "accession", "clinical_question")]
DECISIONS = ("PNEUMONIA", "NORMAL", "REFER")


@pytest.fixture(scope="module")
def reading(tmp_path_factory, web_stack):
    """The app on SQLite in front of the real transformer; alice and bob are doctors, chief an admin."""
    from webapp import accounts
    from webapp.app import create_app
    from webapp.db import transaction
    from webapp.settings import WebSettings

    root = tmp_path_factory.mktemp("reading")
    settings = WebSettings(home=root, inference_url=web_stack.rest, secret_key="test-secret", inline_wait_s=30,
                           retry_initial_s=3600, retry_max_s=3600)
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.ctx.factory) as db:
            for name, admin in (("alice", False), ("bob", False), ("chief", True)):
                accounts.add_user(db, name, PASSWORD, admin=admin)
        tokens = {}
        with transaction(app.state.ctx.factory) as db:
            for name in ("alice", "bob", "chief"):
                tokens[name] = accounts.issue_token(db, name, "tests")[0]

        def api(user: str) -> TestClient:
            other = TestClient(app)
            other.portal = client.portal  # the app's HTTP pool lives on the lifespan's loop
            other.headers["authorization"] = f"Bearer {tokens[user]}"
            return other

        yield {"app": app, "api": api, "settings": settings, "root": root,
               "env": {"PNEUMOSCOPE_HOME": str(root)}}


def upload(reading, user: str, path: Path, identity: dict | None = None, expect: int = 201,
           content: bytes | None = None, mime: str = "image/jpeg") -> dict:
    response = reading["api"](user).post("/api/studies", files={"file": (path.name, content or path.read_bytes(),
                                                                         mime)}, data=identity or {})
    assert response.status_code == expect, response.text
    return response.json()


# -- the migration --------------------------------------------------------------------------------------------

def _migration_round_trip(url: str) -> None:
    from alembic import command

    from webapp.db import _alembic_config, current_revision, head_revision, make_engine, upgrade

    engine = make_engine(url)
    try:
        assert upgrade(engine, "0001") == "0001"
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO users (username, password_hash, is_admin, created_at) VALUES "
                                    "('u', 'x', false, CURRENT_TIMESTAMP)"))
            connection.execute(text(
                "INSERT INTO studies (owner_id, created_at, status, note, storage_prefix, image_format, image_sha256, "
                "image_bytes, has_preview, deidentified, probability, label, has_heatmap, attempts) VALUES "
                "(1, CURRENT_TIMESTAMP, 'done', 'kept', 'p1', 'jpeg', 'abc', 10, false, true, 0.8, 'PNEUMONIA', "
                "false, 1)"))
        assert upgrade(engine) == head_revision()
        columns = {c["name"] for c in inspect(engine).get_columns("studies")}
        assert {"decision", "refer_reasons", "ood_score", "in_intended_use", "model_info", "cam", "lung_mask",
                "cam_lung_share", "lung_share_source", "identity", "display"} <= columns
        assert "report_versions" in inspect(engine).get_table_names()
        with engine.connect() as connection:
            row = connection.execute(text("SELECT note, label, decision, identity FROM studies")).one()
        assert tuple(row) == ("kept", "PNEUMONIA", None, None)  # an older result keeps its label; no decision

        config = _alembic_config(engine)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        assert current_revision(engine) == "0001"
        assert "decision" not in {c["name"] for c in inspect(engine).get_columns("studies")}
        assert "report_versions" not in inspect(engine).get_table_names()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT note FROM studies")).scalar_one() == "kept"
        assert upgrade(engine) == head_revision()
    finally:
        engine.dispose()


def test_migration_0002_upgrades_and_downgrades_on_sqlite(tmp_path):
    _migration_round_trip(f"sqlite:///{tmp_path / 'm.db'}")


def test_migration_0002_upgrades_and_downgrades_on_postgresql(postgres):
    _migration_round_trip(postgres.create_database("migration_0002"))


# -- the answer: decision, reasons, CAM ------------------------------------------------------------------------

def test_the_answer_parser_keeps_every_field_the_transformer_sends():
    """A v2 answer as the transformer sends it once the intended-use and lung-segmentation work has landed."""
    from webapp.inference import InferenceUnavailable, _parse

    reasons = [{"code": "outside_intended_use", "text": "an adult's film"}]
    reply = {"model_name": "pneumonia", "model_version": "9", "parameters": {
        "model_profile": "gpu", "heldout": {"auc": 0.93}, "refer_band": [0.3, 0.7], "unrelated": 1},
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [1], "data": [0.61]},
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["PNEUMONIA"]},
            {"name": "threshold", "datatype": "FP32", "shape": [1], "data": [0.5]},
            {"name": "decision", "datatype": "BYTES", "shape": [1], "data": ["REFER"]},
            {"name": "refer_reasons", "datatype": "BYTES", "shape": [1], "data": [json.dumps(reasons)]},
            {"name": "ood_score", "datatype": "FP32", "shape": [1], "data": [4.2]},
            {"name": "in_intended_use", "datatype": "BOOL", "shape": [1], "data": [False]},
            {"name": "cam", "datatype": "FP32", "shape": [1, 2, 3], "data": [0, 0.5, 1, 0, 0, 0.25]},
            {"name": "lung_mask", "datatype": "FP32", "shape": [1, 2, 3], "data": [0, 1, 1, 0, 1, 1]},
            {"name": "cam_lung_share", "datatype": "FP32", "shape": [1], "data": [0.8]},
            {"name": "quality_flags", "datatype": "BYTES", "shape": [1], "data": ['["object_over_lungs"]']}]}
    result = _parse(reply, 0.1)
    assert (result.decision, result.refer_reasons, result.ood_score, result.in_intended_use) == \
        ("REFER", reasons, pytest.approx(4.2), False)
    assert result.model_info == {"model_profile": "gpu", "heldout": {"auc": 0.93}, "refer_band": [0.3, 0.7]}
    assert result.cam == {"rows": 2, "cols": 3, "values": [0, 0.5, 1, 0, 0, 0.25]}
    assert result.lung_mask["values"] == [0, 1, 1, 0, 1, 1] and result.cam_lung_share == pytest.approx(0.8)
    # a version exported without an out-of-distribution detector: its NaN score travels as JSON null
    no_detector = json.loads(json.dumps(reply))
    next(o for o in no_detector["outputs"] if o["name"] == "ood_score")["data"] = [None]
    assert _parse(no_detector, 0.1).ood_score is None
    assert result.quality_flags == ["object_over_lungs"]
    older = _parse({**reply, "parameters": {}, "outputs": reply["outputs"][:3]}, 0.1)
    assert older.decision is None and older.cam is None and older.model_info is None
    bad = {**reply, "outputs": reply["outputs"][:3] + [{"name": "decision", "shape": [1], "data": ["MAYBE"]}]}
    with pytest.raises(ValueError, match="MAYBE"):
        _parse(bad, 0.1)
    assert issubclass(InferenceUnavailable, Exception)  # a bad answer leaves the study pending (InferenceClient)


def test_a_real_answer_keeps_the_cam_and_its_lung_share(reading):
    study = upload(reading, "alice", full_res_xrays(1, offset=30)[0])
    result = study["result"]
    assert result["decision"] in DECISIONS
    if not result["decision_from_model_server"]:  # an answer without a decision: the label at the threshold
        assert result["decision"] == result["label"]
    cam = reading["api"]("alice").get(study["links"]["cam"]).json()
    grid = np.asarray(cam["cam"]["values"]).reshape(cam["cam"]["rows"], cam["cam"]["cols"])
    assert grid.shape[0] >= 2 and grid.min() >= 0 and grid.max() == pytest.approx(1.0, abs=1e-4)
    assert cam["lung_mask_source"] in ("lung model", "lung-field prior")
    assert 0.0 <= result["cam_lung_share"] <= 1.0 and result["lung_share_source"] == cam["lung_share_source"]
    assert cam["lung_share_source"] == cam["lung_mask_source"] or cam["cam_lung_share"] is not None


def test_the_lung_share_is_low_when_the_evidence_is_outside_the_lungs(reading):
    """The display side of the planted-marker test: a CAM peaking under the diaphragm, in a corner."""
    study = upload(reading, "alice", full_res_xrays(1, offset=31)[0])
    store_result(reading["env"], study["id"], cam=cam_grid(8, 8, {(7, 0): 1.0, (7, 1): 0.6}))
    corner = reading["api"]("alice").get(f"/api/studies/{study['id']}").json()["result"]
    store_result(reading["env"], study["id"], cam=cam_grid(8, 8, {(3, 2): 1.0, (3, 5): 0.9}))
    lungs = reading["api"]("alice").get(f"/api/studies/{study['id']}").json()["result"]
    assert corner["cam_lung_share"] < 0.1 < 0.8 < lungs["cam_lung_share"], (corner, lungs)
    assert corner["lung_share_source"] == "lung-field prior"


def test_the_served_decision_and_its_reasons_reach_the_study(reading):
    study = upload(reading, "alice", full_res_xrays(1, offset=32)[0])
    result = study["result"]
    assert result["decision_from_model_server"] and result["decision"] in DECISIONS
    assert isinstance(result["in_intended_use"], bool) and result["ood_score"] is not None
    assert result["model_info"] and (result["decision"] != "REFER" or result["refer_reasons"])


def test_refer_and_its_reasons_are_stored_and_served(reading):
    study = upload(reading, "alice", full_res_xrays(1, offset=33)[0])
    reasons = [{"code": "indeterminate", "text": "The probability lies in the refer band."}]
    store_result(reading["env"], study["id"], probability=0.52, label="PNEUMONIA", decision="REFER",
                 refer_reasons=reasons, ood_score=0.7, in_intended_use=True,
                 model_info={"profile": "demo", "demonstration": True, "heldout": {"auc": 0.9},
                             "refer_band": [0.35, 0.65]}, quality_flags=["object_over_lungs"])
    result = reading["api"]("alice").get(f"/api/studies/{study['id']}").json()["result"]
    assert (result["decision"], result["label"], result["refer_reasons"]) == ("REFER", "PNEUMONIA", reasons)
    assert result["model_info"]["demonstration"] is True and result["in_intended_use"] is True
    assert result["quality_warnings"][0]["code"] == "object_over_lungs"
    assert "read with care" in result["quality_warnings"][0]["action"].lower()
    listing = reading["api"]("alice").get("/api/studies", params={"decision": "REFER"}).json()
    assert [s["id"] for s in listing["items"]] == [study["id"]]


def test_a_referred_film_is_reviewed_by_the_doctors_reading(reading):
    """REFER gives no finding to confirm: the review is the doctor's reading, stored as agreeing with the label
    under the referral or not; "confirmed" is refused with a reason, and the page asks for the reading."""
    study = upload(reading, "alice", full_res_xrays(1, offset=36)[0])
    store_result(reading["env"], study["id"], probability=0.52, label="PNEUMONIA", decision="REFER",
                 refer_reasons=[{"code": "uncertain", "text": "In the refer band."}])
    api = reading["api"]("alice")
    confirmed = api.post(f"/api/studies/{study['id']}/feedback", json={"verdict": "confirmed"})
    assert confirmed.status_code == 400 and "gave no finding" in confirmed.json()["error"]
    page = api.get(f"/studies/{study['id']}")
    assert 'id="refer-review"' in page.text and 'id="verdict-confirmed"' not in page.text
    agree = api.post(f"/api/studies/{study['id']}/feedback", json={"verdict": "corrected", "label": "PNEUMONIA"})
    assert agree.status_code == 200 and agree.json()["feedback"]["verdict"] == "confirmed", agree.text
    other = api.post(f"/api/studies/{study['id']}/feedback", json={"verdict": "corrected", "label": "NORMAL"})
    assert other.status_code == 200, other.text
    assert (other.json()["feedback"]["verdict"], other.json()["feedback"]["label"]) == ("corrected", "NORMAL")


# -- identity --------------------------------------------------------------------------------------------------

def _database_bytes(root: Path) -> bytes:
    """The SQLite database as it lies on disk, its write-ahead log included."""
    return b"".join(p.read_bytes() for p in sorted(root.glob("webapp.db*")))


def test_patient_fields_are_encrypted_at_rest_and_shown_only_to_owner_and_admin(reading, tmp_path, caplog):
    caplog.set_level("DEBUG")
    study = upload(reading, "alice", full_res_xrays(1, offset=34)[0], PATIENT)
    assert study["patient"] == PATIENT
    stored = _database_bytes(reading["root"])
    for value in DISTINCT:
        assert value.encode() not in stored, f"{value!r} readable in the database file"
    with reading["app"].state.ctx.factory() as db:
        from webapp.models import Study

        token = db.get(Study, study["id"]).identity
    assert token.startswith("gAAAA")  # a Fernet token
    assert reading["api"]("alice").get(f"/api/studies/{study['id']}").json()["patient"] == PATIENT
    assert reading["api"]("chief").get(f"/api/studies/{study['id']}").json()["patient"] == PATIENT
    assert reading["api"]("bob").get(f"/api/studies/{study['id']}").status_code == 404
    assert all(value not in caplog.text for value in DISTINCT)

    # the doctor corrects a field while the report is not signed; a bad value is refused with the reason
    changed = reading["api"]("alice").put(f"/api/studies/{study['id']}/patient", json={**PATIENT, "view": "PA"})
    assert changed.status_code == 200 and changed.json()["patient"]["view"] == "PA"
    refused = reading["api"]("alice").put(f"/api/studies/{study['id']}/patient", json={"view": "sideways"})
    assert refused.status_code == 422 and "view must be one of" in refused.json()["error"]

    # exports carry no identity
    from webapp.studies import export_reviewed

    served = reading["api"]("alice").get(f"/api/studies/{study['id']}").json()["result"]
    review = ({"verdict": "corrected", "label": served["label"]} if served["decision"] == "REFER"
              else {"verdict": "confirmed"})  # a referred film gets the doctor's reading
    reviewed = reading["api"]("alice").post(f"/api/studies/{study['id']}/feedback", json=review)
    assert reviewed.status_code == 200, reviewed.text
    export_reviewed(reading["app"].state.ctx.factory, reading["app"].state.ctx.store, tmp_path / "export")
    exported = b"".join(p.read_bytes() for p in (tmp_path / "export").rglob("*") if p.is_file())
    assert all(value.encode() not in exported for value in DISTINCT)


def test_dicom_identity_is_read_before_de_identification_and_the_display_copy_keeps_16_bits(reading, web_stack):
    source = full_res_xrays(1, offset=35)[0]
    data = dicom_16bit(source, window=(1800, 2400))
    study = upload(reading, "alice", source, {"accession": "typed-by-the-doctor"}, content=data,
                   mime="application/dicom")
    # the header's patient id, view and reason for the request; the doctor's accession number wins
    assert study["patient"] == {"patient_ref": "MRN-445566", "accession": "typed-by-the-doctor", "view": "PA",
                                "clinical_question": "fever and cough for three days"}
    original = reading["api"]("alice").get(f"/api/studies/{study['id']}/image").content
    assert b"MRN-445566" not in original and b"fever and cough" not in original  # de-identified file
    display = study["display"]
    assert display["window_source"] == "window" and display["invert"] is False
    import pydicom

    pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert (display["width"], display["height"]) == (pixels.shape[1], pixels.shape[0])
    response = reading["api"]("alice").get(study["links"]["pixels"])
    assert response.status_code == 200 and response.headers["content-encoding"] == "gzip"
    values = np.frombuffer(response.content, dtype="<u2").reshape(display["height"], display["width"])
    restored = values.astype(np.float64) * display["scale"] + display["offset"]
    assert np.array_equal(restored, pixels)  # every one of the 12 bits, not an 8-bit rendering
    assert display["window_center"] == pytest.approx(1800 - display["offset"]) and display["window_width"] == 2400
    assert reading["api"]("alice").get(f"/api/studies/{upload(reading, 'alice', source)['id']}/pixels") \
        .status_code == 409


def signed_in(reading, user: str) -> TestClient:
    """A browser's session (cookie and CSRF token) instead of a bearer token: what the report form needs."""
    client = reading["api"](user)
    del client.headers["authorization"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    signed = client.post("/login", data={"username": user, "password": PASSWORD, "csrf_token": token, "next": "/"})
    assert signed.status_code == 200, signed.text
    return client


def test_a_dicom_headers_non_frontal_view_is_kept_and_shown_as_not_frontal(reading):
    """A lateral film's View Position (LL) stays the study's view: the JSON keeps the standard's term, the study page,
    the report form (as the selected option, so saving the draft keeps it) and the PDF say it is not frontal, beside
    the serving stack's view_not_frontal referral. PA stays PA; a word the standard does not define is left out."""
    from pypdf import PdfReader

    source = full_res_xrays(1, offset=37)[0]
    studies = {written: upload(reading, "alice", source, content=dicom_16bit(source, view=written),
                               mime="application/dicom") for written in ("LL", "PA", "SIDEWAYS")}
    assert studies["PA"]["patient"]["view"] == "PA"
    assert "view" not in studies["SIDEWAYS"]["patient"]
    lateral = studies["LL"]
    assert lateral["patient"]["view"] == "LL"
    assert lateral["result"]["decision"] == "REFER"
    assert "view_not_frontal" in [reason["code"] for reason in lateral["result"]["refer_reasons"]]

    alice = signed_in(reading, "alice")
    page = alice.get(f"/studies/{lateral['id']}").text
    assert "view LL (not frontal)" in page
    assert re.search(r"<dt>View</dt><dd>LL \(not frontal\)</dd>", page)
    form = alice.get(f"/studies/{lateral['id']}/report").text
    assert re.findall(r'<option value="([^"]*)" selected>', form) == ["LL"]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    saved = alice.post(f"/studies/{lateral['id']}/report", data={  # what the browser posts: the selected option
        "action": "save", "impression": "Lateral film; read the frontal one.", "view": "LL", "csrf_token": csrf})
    assert saved.status_code == 200, saved.text
    assert reading["api"]("alice").get(f"/api/studies/{lateral['id']}").json()["patient"]["view"] == "LL"
    pdf = PdfReader(io.BytesIO(reading["api"]("alice").get(f"/api/studies/{lateral['id']}/report").content))
    assert "LL (not frontal)" in pdf.pages[0].extract_text()
    frontal_form = alice.get(f"/studies/{studies['PA']['id']}/report").text
    assert re.findall(r'<option value="([^"]*)" selected>', frontal_form) == ["PA"]
    assert 'value="LL"' not in frontal_form  # a doctor sets PA, AP or unknown by hand


def test_a_coded_lateral_view_is_kept_and_referred_as_a_written_one(reading):
    """A modality that codes the view (View Code Sequence, here the older SNOMED-RT code of "left lateral") and
    leaves View Position empty: the study's view is LL, and the film is referred as not frontal: the coded view
    survives the de-identification that the serving stack's copy goes through."""
    import highdicom as hd
    import pydicom

    source = full_res_xrays(1, offset=39)[0]
    dataset = pydicom.dcmread(io.BytesIO(dicom_16bit(source, view="")))
    dataset.ViewCodeSequence = [hd.sr.CodedConcept("R-10236", "SRT", "left lateral")]
    coded = io.BytesIO()
    dataset.save_as(coded, enforce_file_format=True)
    study = upload(reading, "alice", source, content=coded.getvalue(), mime="application/dicom")
    assert study["patient"]["view"] == "LL"
    assert study["result"]["decision"] == "REFER"
    assert "view_not_frontal" in [reason["code"] for reason in study["result"]["refer_reasons"]]


def test_the_api_takes_the_standards_non_frontal_views_and_refuses_other_words(reading):
    study = upload(reading, "alice", full_res_xrays(1, offset=38)[0], {"view": "RLD"})
    assert study["patient"]["view"] == "RLD"
    patient = f"/api/studies/{study['id']}/patient"
    alice = reading["api"]("alice")
    assert alice.put(patient, json={"view": "LL"}).json()["patient"]["view"] == "LL"
    assert alice.put(patient, json={"view": " lateral "}).json()["patient"]["view"] == "LATERAL"  # as written
    refused = alice.put(patient, json={"view": "XX"})
    assert refused.status_code == 422
    assert "view must be one of PA, AP" in refused.json()["error"] and "LL" in refused.json()["error"]
    assert alice.get(f"/api/studies/{study['id']}").json()["patient"]["view"] == "LATERAL"  # unchanged
    schema = reading["api"]("alice").get("/openapi.json").json()["paths"]["/api/studies"]["post"]["requestBody"]
    view = schema["content"]["multipart/form-data"]["schema"]["properties"]["view"]
    assert {"", "PA", "AP", "LL", "RLD", "LATERAL"} <= set(view["enum"]) and "XX" not in view["enum"]
    assert view["maxLength"] == max(len(term) for term in view["enum"])


# -- the worklist ----------------------------------------------------------------------------------------------

def test_the_worklist_orders_by_suspicion_or_by_time_with_thumbnails(reading):
    from sqlalchemy import update

    from webapp.models import Study

    films = full_res_xrays(6, offset=36)
    answers = [dict(probability=0.2, label="NORMAL", decision="NORMAL"),
               dict(probability=0.7, label="PNEUMONIA", decision="PNEUMONIA"),
               dict(probability=0.5, label="PNEUMONIA", decision="REFER"),
               dict(probability=0.95, label="PNEUMONIA", decision="PNEUMONIA"),
               dict(probability=0.6, label="PNEUMONIA", decision=None),  # an older server: its label decides
               None]  # stays pending
    ids = []
    for film, answer in zip(films, answers):
        study = upload(reading, "bob", film)
        ids.append(study["id"])
        if answer is not None:
            store_result(reading["env"], study["id"], **answer)
    with reading["app"].state.ctx.factory() as db:
        db.execute(update(Study).where(Study.id == ids[5]).values(status="pending", probability=None, label=None))
        db.commit()
    bob = reading["api"]("bob")
    by_suspicion = [s["id"] for s in bob.get("/api/studies", params={"sort": "suspicion"}).json()["items"]]
    assert by_suspicion == [ids[3], ids[1], ids[4], ids[2], ids[0], ids[5]]
    by_time = [s["id"] for s in bob.get("/api/studies", params={"sort": "time"}).json()["items"]]
    assert by_time == ids[::-1]
    thumbnail = bob.get(f"/api/studies/{ids[0]}/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.content.startswith(b"\x89PNG")
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 160
    assert bob.get("/api/studies", params={"sort": "random"}).status_code == 422


# -- the report ------------------------------------------------------------------------------------------------

def test_sign_off_locks_the_report_and_a_correction_makes_a_new_version(reading):
    from pypdf import PdfReader

    study = upload(reading, "alice", full_res_xrays(1, offset=44)[0], PATIENT)
    alice = reading["api"]("alice")
    base = f"/api/studies/{study['id']}"
    assert alice.post(f"{base}/report/sign").status_code == 409  # nothing written yet
    draft = alice.put(f"{base}/report/draft", json={"impression": "Right basal consolidation."})
    assert draft.status_code == 200 and draft.json()["versions"][0]["state"] == "draft"
    signed = alice.post(f"{base}/report/sign").json()["versions"][0]
    assert signed["state"] == "signed" and signed["signed_by"] == "alice" and signed["signed_at"]
    assert signed["patient"] == PATIENT and signed["finding"]["decision"] == study["result"]["decision"]

    locked = alice.put(f"{base}/report/draft", json={"impression": "changed my mind"})
    assert locked.status_code == 409 and "read-only" in locked.json()["error"]
    assert alice.put(f"{base}/patient", json={"patient_ref": "other"}).status_code == 409
    assert alice.post(f"{base}/report/sign").status_code == 409
    assert alice.post(f"{base}/report/corrections", json={"reason": ""}).status_code == 422

    corrected = alice.post(f"{base}/report/corrections", json={"reason": "wrong side"}).json()["versions"]
    assert [(v["version"], v["state"], v["corrects"]) for v in corrected] == [(1, "signed", None), (2, "draft", 1)]
    alice.put(f"{base}/report/draft", json={"impression": "Left basal consolidation.",
                                            "patient": {**PATIENT, "view": "PA"}})
    alice.post(f"{base}/report/sign")
    versions = alice.get(f"{base}/report/versions").json()["versions"]
    assert versions[0]["impression"] == "Right basal consolidation." and versions[0]["patient"]["view"] == "AP"
    assert versions[1]["impression"] == "Left basal consolidation." and versions[1]["patient"]["view"] == "PA"
    assert versions[1]["correction_reason"] == "wrong side"

    pdf = alice.get(f"{base}/report")
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["content-disposition"] == f'attachment; filename="pneumoscope-study-{study["id"]}-v2.pdf"'
    reader = PdfReader(io.BytesIO(pdf.content))
    assert len(reader.pages) == 1
    fonts = reader.pages[0]["/Resources"]["/Font"]
    for font in fonts.values():
        descriptor = font.get_object()["/DescendantFonts"][0].get_object()["/FontDescriptor"]
        assert "/FontFile2" in descriptor, "a font is not embedded"
    shown = reader.pages[0].extract_text()
    assert re.search(r"\bpneumonia\b", shown) and "P neumonia" not in shown  # one word, as the font spaces it
    for expected in ("Left basal consolidation.", "Signed by alice", "Corrects version 1",
                     PATIENT["patient_ref"], "does not replace"):
        assert expected in shown, expected
    first = PdfReader(io.BytesIO(alice.get(f"{base}/report", params={"version": 1}).content)).pages[0].extract_text()
    assert "Right basal consolidation." in first and "Left basal" not in first
    assert alice.get(f"{base}/report", params={"version": 9}).status_code == 404
    assert reading["api"]("bob").get(f"{base}/report/versions").status_code == 404
