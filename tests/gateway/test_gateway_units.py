"""The gateway's stages on their own, without processes: settings, the chest filter, what is kept of the original,
the SR's content (with and without the intended-use fields), the migration, and the command's registration."""

from __future__ import annotations

import io
import tomllib
from datetime import datetime, timezone

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from conftest import REPO
from gateway import chest_filter, originals
from gateway.result_facts import ResultFacts
from gateway.settings import DEFAULT_MAX_OBJECT_BYTES, GatewaySettings, parse_destination
from gateway.sr_writer import build_sr


def test_the_default_size_limits_admit_real_films_end_to_end():
    """16-bit CR/DX films are 10-30 MB: the gateway admits them, and the transformer admits what the gateway sends
    (the de-identified file, about as large, plus the request's JSON header)."""
    from serving.settings import ServingSettings
    from webapp.settings import WebSettings

    assert DEFAULT_MAX_OBJECT_BYTES >= 30_000_000
    assert GatewaySettings().max_object_bytes == DEFAULT_MAX_OBJECT_BYTES
    assert ServingSettings().max_payload_bytes >= DEFAULT_MAX_OBJECT_BYTES + 4096
    assert ServingSettings().max_payload_bytes >= WebSettings().max_upload_bytes + 4096


def test_destinations_are_dicomweb_urls_or_dicom_nodes():
    assert parse_destination("http://pacs:8042/dicom-web/").url == "http://pacs:8042/dicom-web"
    node = parse_destination("dicom://ORTHANC@pacs.example:4242")
    assert (node.kind, node.ae_title, node.host, node.port) == ("cstore", "ORTHANC", "pacs.example", 4242)
    assert parse_destination("https://user:secret@pacs/dicom-web").describe() == "STOW-RS https://pacs/dicom-web"
    for bad in ("ftp://pacs", "dicom://pacs:4242", "pacs:4242", "dicom://A_TITLE_LONGER_THAN_16@pacs:1"):
        with pytest.raises(ValueError):
            parse_destination(bad)
    with pytest.raises(ValueError, match="not an AE title"):
        GatewaySettings(allowed_aes="GOOD,BAD\\TITLE")
    assert GatewaySettings(allowed_aes=" A , B,").allowed_ae_titles() == ["A", "B"]
    assert GatewaySettings(pull="http://pacs/dicom-web").destination().kind == "stow"  # results go where films are


@pytest.mark.parametrize("tags, score, reason", [
    ({"Modality": "DX", "BodyPartExamined": "CHEST"}, True, ""),
    ({"Modality": "CR"}, True, ""),
    ({"Modality": "dx", "BodyPartExamined": "chest "}, True, ""),
    ({"Modality": "CT", "BodyPartExamined": "CHEST"}, False, "modality"),
    ({"Modality": "SR"}, False, "modality"),
    ({}, False, "modality"),
    ({"Modality": "DX", "BodyPartExamined": "HAND"}, False, "body_part"),
    ({"Modality": "DX", "NumberOfFrames": 2}, False, "multiframe"),
    ({"Modality": "DX", "ViewPosition": "PA"}, True, ""),
    ({"Modality": "CR", "ViewPosition": "ap "}, True, ""),
    ({"Modality": "DX", "ViewPosition": "LL"}, False, "view"),
    ({"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "RLD"}, False, "view"),
    ({"Modality": "CR", "ViewPosition": "LATERAL"}, False, "view"),
    ({"Modality": "DX", "ViewPosition": "XYZ"}, True, ""),  # not a term of the standard: nothing claimed
    ({"Modality": "DX", "ViewCodeSequence": ("399173006", "SCT")}, False, "view"),  # coded left lateral
    ({"Modality": "DX", "ViewPosition": "", "ViewCodeSequence": ("R-10206", "SRT")}, True, ""),  # coded frontal
])
def test_only_single_frame_frontal_chest_cr_and_dx_are_scored(tags, score, reason):
    header = Dataset()
    for key, value in tags.items():
        if key == "ViewCodeSequence":
            value = [hd.sr.CodedConcept(*value, "a view")]
        setattr(header, key, value)
    verdict = chest_filter.classify(header)
    assert (verdict.score, verdict.reason) == (score, reason)


def _original() -> Dataset:
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Müller^Jörg", "MRN-1", "19700101", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
        "20260101", "101500", "ACC-1", "", "S1"
    ds.InstitutionName, ds.OtherPatientIDs = "Hospital", "OTHER-ID"
    return ds


def test_only_the_patient_and_study_modules_and_the_uids_are_kept():
    original = _original()
    kept = originals.restore(originals.extract(original))
    assert kept.PatientName == "Müller^Jörg" and kept.StudyInstanceUID == original.StudyInstanceUID
    assert "InstitutionName" not in kept and "OtherPatientIDs" not in kept
    del original.SeriesInstanceUID
    with pytest.raises(originals.MissingIdentity, match="SeriesInstanceUID"):
        originals.extract(original)


def _facts(**extra) -> ResultFacts:
    return ResultFacts(probability=0.83, label="PNEUMONIA", threshold=0.5, model_name="pneumonia", model_version="7",
                       scored_at=datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc),
                       quality_flags=["blurred"], **extra)


def _codes(sr) -> dict:
    found = {}

    def walk(items):
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if "MeasuredValueSequence" in item:
                found[code] = float(item.MeasuredValueSequence[0].NumericValue)
            elif "ConceptCodeSequence" in item:
                found.setdefault(code, []).append(item.ConceptCodeSequence[0].CodeMeaning)
            elif "TextValue" in item:
                found.setdefault(code, []).append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_the_sr_states_the_finding_probability_threshold_flags_and_algorithm():
    original = _original()
    sr = pydicom.dcmread(io.BytesIO(build_sr(original, _facts(), "1.2.3.4", "1.2.3.5", "pneumoscope", "1.2.3.6")))
    content = _codes(sr)
    assert content["P-PROB"] == pytest.approx(0.83) and content["P-THR"] == pytest.approx(0.5)
    assert content["233604007"] == ["Present"] and content["P-QUAL"] == ["blurred"]
    assert content["111001"] == ["pneumonia"] and content["111003"] == ["7"]
    assert "P-DEC" not in content and "111002" not in content  # no decision, no digest in today's answer
    assert (sr.VerificationFlag, sr.StudyInstanceUID, sr.PatientName) == ("UNVERIFIED", original.StudyInstanceUID,
                                                                          "Müller^Jörg")
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID


def test_the_sr_carries_the_decision_refer_reasons_and_digest_when_the_answer_names_them():
    facts = _facts(decision="REFER", refer_reasons=["out_of_distribution"], ood_score=3.5, in_intended_use=False,
                   model_sha256="ab" * 32)
    sr = pydicom.dcmread(io.BytesIO(build_sr(_original(), facts, "1.2.3.4", "1.2.3.5", "pneumoscope", "1.2.3.6")))
    content = _codes(sr)
    assert content["233604007"] == ["Indeterminate"] and content["P-DEC"] == ["REFER"]
    assert content["P-REFER"] == ["out of distribution"] and content["P-OOD"] == pytest.approx(3.5)
    assert content["P-USE"] == ["No"] and content["111002"] == [f"sha256:{'ab' * 32}"]  # algorithm parameters


def test_migration_0003_upgrades_and_downgrades(tmp_path):
    from sqlalchemy import inspect

    from webapp.db import _alembic_config, head_revision, make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert upgrade(engine) == head_revision()
    assert {"gateway_instances", "gateway_outbox"} <= set(inspect(engine).get_table_names())
    assert {"source", "pacs_original"} <= {c["name"] for c in inspect(engine).get_columns("studies")}
    from alembic import command

    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    inspector = inspect(engine)
    assert "gateway_outbox" not in inspector.get_table_names()
    assert "source" not in {c["name"] for c in inspector.get_columns("studies")}
    assert upgrade(engine) == head_revision()


def test_the_gateway_command_is_registered_like_the_others():
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["pneumoscope.commands"]
    assert entry["gateway"] == "gateway.cli:add_commands"
    from model.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog="pneumoscope")
    from gateway.cli import add_commands

    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gateway", "--pull", "http://pacs/dicom-web", "--port", "104"])
    assert (args.pull, args.port) == ("http://pacs/dicom-web", 104)


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "gateway", "--send-to", "ftp://pacs", "--home", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "send_to" in result.stderr, result.stderr


def test_studies_from_the_pacs_belong_to_the_service_user_and_only_admins_see_the_original(tmp_path):
    from fastapi.testclient import TestClient

    from webapp import accounts
    from webapp.app import create_app
    from webapp.db import transaction
    from webapp.models import Study
    from webapp.settings import WebSettings

    settings = WebSettings(home=tmp_path, secret_key="test", inference_url="http://127.0.0.1:9")
    app = create_app(settings)
    with TestClient(app) as client:
        factory = app.state.ctx.factory
        with transaction(factory) as db:
            service = accounts.add_user(db, "pacs-gateway", "a-long-random-password")
            accounts.add_user(db, "chief", "a-long-test-password", admin=True)
            accounts.add_user(db, "alice", "a-long-test-password")
            token = settings.field_cipher().encrypt(originals.extract(_original()))
            study = Study(owner_id=service.id, source="PACS", pacs_original=token, storage_prefix="p1",
                          image_format="dicom", image_sha256="0" * 64, image_bytes=1, status="rejected")
            db.add(study)
            db.flush()
            study_id = study.id
        with transaction(factory) as db:
            tokens = {name: accounts.issue_token(db, name, "t")[0] for name in ("chief", "alice")}
        as_admin = client.get(f"/api/studies/{study_id}", headers={"authorization": f"Bearer {tokens['chief']}"})
        assert as_admin.status_code == 200
        body = as_admin.json()
        assert (body["source"], body["owner"]) == ("PACS", "pacs-gateway")
        assert body["pacs"]["patient_name"] == "Müller^Jörg" and body["pacs"]["accession_number"] == "ACC-1"
        listed = client.get("/api/studies", headers={"authorization": f"Bearer {tokens['chief']}"}).json()
        assert [s["source"] for s in listed["items"]] == ["PACS"] and "pacs" not in listed["items"][0]
        as_user = client.get(f"/api/studies/{study_id}", headers={"authorization": f"Bearer {tokens['alice']}"})
        assert as_user.status_code == 404
        with transaction(factory) as db:
            db.get(Study, study_id).pacs_original = None  # what the outbox does once every result is stored
        body = client.get(f"/api/studies/{study_id}", headers={"authorization": f"Bearer {tokens['chief']}"}).json()
        assert "pacs" not in body


def test_a_wake_during_a_pass_starts_the_next_pass_at_once():
    """A film accepted while the scorer is busy with another must not wait for the poll interval."""
    import asyncio
    import time

    from gateway.worker import run_passes

    async def scenario() -> list[float]:
        stop, wake = asyncio.Event(), asyncio.Event()
        passes: list[float] = []

        async def one_pass() -> bool:
            passes.append(time.perf_counter())
            if len(passes) == 1:
                await asyncio.sleep(0.05)
                wake.set()  # woken while this pass runs
            elif len(passes) == 2:
                stop.set()
            return False

        started = time.perf_counter()
        await asyncio.wait_for(run_passes("test", one_pass, stop, wake, interval_s=30.0), timeout=10)
        return [t - started for t in passes]

    passes = asyncio.run(scenario())
    assert len(passes) == 2 and passes[1] < 1.0, passes  # not after the 30 s interval


class _SentUids:
    """A sender that records the SOP Instance UIDs it was given."""

    def __init__(self):
        self.uids = []

    def send(self, data, sop_instance_uid):
        self.uids.append(sop_instance_uid)


def _outbox_with_a_scoring_film(tmp_path, settings: GatewaySettings):
    """The gateway's real database (migrated SQLite), image store and field cipher under ``tmp_path``, an outbox on
    them, and one scored PACS film in state ``scoring``: (outbox, session factory, sender, instance id, study id)."""
    from gateway.outbox import Outbox
    from gateway.records import GatewayInstance
    from webapp import accounts
    from webapp.db import make_engine, session_factory, transaction, upgrade
    from webapp.models import Study
    from webapp.settings import WebSettings
    from webapp.storage import ImageStore

    web = WebSettings(home=tmp_path, secret_key="test", inference_url="http://127.0.0.1:9")
    engine = make_engine(web.resolved_database_url())
    upgrade(engine)
    factory = session_factory(engine)
    sender = _SentUids()
    outbox = Outbox(settings, factory, ImageStore(web.resolved_image_store()), web.field_cipher(), sender)
    with transaction(factory) as db:
        owner = accounts.add_user(db, "pacs-gateway", "a-long-random-password")
        study = Study(owner_id=owner.id, source="PACS", pacs_original="token", storage_prefix="p1",
                      image_format="dicom", image_sha256="0" * 64, image_bytes=1, status="done")
        db.add(study)
        db.flush()
        instance = GatewayInstance(fingerprint="f" * 64, state="scoring", calling_ae="PACS", study_id=study.id)
        db.add(instance)
        db.flush()
        instance_id, study_id = instance.id, study.id
    return outbox, factory, sender, instance_id, study_id


def test_results_reserved_while_built_keep_the_film_open_and_are_built_again_when_their_lease_runs_out(tmp_path):
    """The SR is queued before the Secondary Capture and the PDF are built: their rows are reserved beside it, the
    film is not done when the SR alone is sent, and a reserved row whose builder stopped is claimed again."""
    from datetime import timedelta

    from sqlalchemy import update

    from gateway.records import GatewayInstance, OutboxItem
    from webapp.db import transaction
    from webapp.models import Study, utcnow

    outbox, factory, sender, instance_id, study_id = _outbox_with_a_scoring_film(tmp_path, GatewaySettings())

    reserved = outbox.put(instance_id, "p1", [("sr", "1.2.3.1", b"SR")], [("sc", "1.2.3.2"), ("pdf", "1.2.3.3")])
    assert set(reserved) == {"sc", "pdf"}
    assert outbox.put(instance_id, "p1", [("sr", "1.2.3.9", b"SR")]) is None  # queued once only
    assert outbox.claim_unbuilt(8) == []  # their builder holds the lease
    assert [outbox.send_one(i) for i in outbox.claim_due(8)] == ["stored"] and sender.uids == ["1.2.3.1"]
    with factory() as db:
        assert db.get(GatewayInstance, instance_id).state == "sending"  # the SC and the PDF are still to come
        assert db.get(Study, study_id).pacs_original == "token"  # kept to build them

    assert outbox.complete(reserved["sc"], b"SC")
    assert not outbox.complete(reserved["sc"], b"SC again")  # built once
    with transaction(factory) as db:  # the PDF's builder stopped: its lease runs out
        db.execute(update(OutboxItem).where(OutboxItem.id == reserved["pdf"])
                   .values(lease_until=utcnow() - timedelta(seconds=1)))
    assert outbox.claim_unbuilt(8) == [(reserved["pdf"], study_id, "pdf", "1.2.3.3")]
    assert outbox.claim_unbuilt(8) == []  # claimed by one builder only
    assert outbox.complete(reserved["pdf"], b"PDF")
    assert sorted(outbox.send_one(i) for i in outbox.claim_due(8)) == ["stored", "stored"]
    assert sorted(sender.uids) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]  # each sent once
    with factory() as db:
        assert db.get(GatewayInstance, instance_id).state == "done"
        assert db.get(Study, study_id).pacs_original is None
    assert (tmp_path / "studies" / "p1").is_dir() and not list((tmp_path / "studies").rglob("*.enc"))  # removed


def test_a_running_build_renews_its_lease_and_leaves_a_queued_or_given_up_result_alone(tmp_path):
    """The heartbeat of a slow build: renewing extends the lease of a reserved row still being built (so no other
    scorer claims it, even after its first lease ran out), and touches neither a result already queued nor one
    given up."""
    from datetime import timedelta

    from sqlalchemy import update

    from gateway.records import OutboxItem
    from webapp.db import transaction
    from webapp.models import utcnow

    outbox, factory, _, instance_id, _ = _outbox_with_a_scoring_film(tmp_path, GatewaySettings(build_lease_s=15))
    reserved = outbox.put(instance_id, "p1", [("sr", "1.2.3.1", b"SR")], [("sc", "1.2.3.2"), ("pdf", "1.2.3.3")])
    assert outbox.complete(reserved["sc"], b"SC")
    with transaction(factory) as db:  # the PDF's first lease ran out while its build still runs
        db.execute(update(OutboxItem).where(OutboxItem.id == reserved["pdf"])
                   .values(lease_until=utcnow() - timedelta(seconds=1)))

    def row(item_id: int) -> tuple:
        with factory() as db:
            item = db.get(OutboxItem, item_id)
            return item.state, item.lease_until, item.blob_key, item.next_attempt_at

    queued = row(reserved["sc"])
    before = utcnow()
    assert outbox.renew_build_leases(list(reserved.values())) == 1
    state, lease_until, _, _ = row(reserved["pdf"])
    assert state == "building" and before + timedelta(seconds=15) <= lease_until <= utcnow() + timedelta(seconds=15)
    assert row(reserved["sc"]) == queued and queued[0] == "waiting" and queued[1] is None  # left alone
    assert outbox.claim_unbuilt(8) == []  # renewed: no other scorer builds it again

    outbox.give_up_build(reserved["pdf"], "the study was deleted")
    given_up = row(reserved["pdf"])
    assert outbox.renew_build_leases([reserved["pdf"]]) == 0 and row(reserved["pdf"]) == given_up
    assert given_up[0] == "failed" and given_up[1] is None


def test_a_build_goes_on_and_is_queued_when_its_lease_cannot_be_renewed_for_a_while(tmp_path, caplog):
    """The database out of reach while a build runs (its outbox table renamed away under the scorer: every renewal
    fails for real): the scorer logs it and waits on, and queues the build once the database is back, instead of
    ending its pass and leaving the result to be built again."""
    import threading
    import time

    from sqlalchemy import text

    from gateway.records import OutboxItem
    from gateway.score import Scorer
    from webapp.db import transaction
    from webapp.settings import WebSettings
    from webapp.storage import ImageStore

    settings = GatewaySettings(build_lease_s=0.3)
    outbox, factory, _, instance_id, _ = _outbox_with_a_scoring_film(tmp_path, settings)
    web = WebSettings(home=tmp_path, secret_key="test", inference_url="http://127.0.0.1:9")
    scorer = Scorer(settings, factory, ImageStore(web.resolved_image_store()), web.field_cipher(), None, outbox,
                    send=True)
    reserved = outbox.put(instance_id, "p1", [("sr", "1.2.3.1", b"SR")], [("pdf", "1.2.3.3")])
    release = threading.Event()
    build = scorer._builders.submit(lambda: release.wait(30) and b"PDF")
    queued: list = []
    waiting = threading.Thread(target=lambda: queued.extend(scorer._queue_when_built(
        {build: (reserved["pdf"], 1, "pdf")})))
    with caplog.at_level("WARNING", logger="gateway.score"):
        with transaction(factory) as db:
            db.execute(text("ALTER TABLE gateway_outbox RENAME TO gateway_outbox_away"))
        waiting.start()
        deadline = time.monotonic() + 10
        while "could not be renewed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "could not be renewed (OperationalError)" in caplog.text and waiting.is_alive()
        with transaction(factory) as db:
            db.execute(text("ALTER TABLE gateway_outbox_away RENAME TO gateway_outbox"))
        release.set()
        waiting.join(10)
    assert not waiting.is_alive() and queued == [(1, "pdf")]
    with factory() as db:
        assert db.get(OutboxItem, reserved["pdf"]).state == "waiting"  # queued, not left to be built again
    scorer._builders.shutdown()


@pytest.mark.parametrize("decision, label, headline", [("REFER", "PNEUMONIA", "Refer: no automated decision"),
                                                       ("REFER", "NORMAL", "Refer: no automated decision"),
                                                       ("PNEUMONIA", "PNEUMONIA", "Pneumonia suspected"),
                                                       ("NORMAL", "NORMAL", "No pneumonia detected"),
                                                       (None, "PNEUMONIA", "Pneumonia suspected")])
def test_the_secondary_captures_caption_and_the_srs_finding_follow_the_served_decision(decision, label, headline):
    """A REFER above the threshold (the model unsure, or the film outside its intended use) is captioned 'Refer',
    never 'Pneumonia suspected', and its SR's finding is indeterminate; the decision comes from the study row."""
    from types import SimpleNamespace

    from gateway.result_facts import facts_from
    from gateway.secondary_capture_writer import caption

    row = SimpleNamespace(probability=0.999, label=label, threshold=0.998, model_name="pneumonia", model_version="7",
                          scored_at=datetime(2026, 12, 6, 19, 0, tzinfo=timezone.utc), quality_flags=[],
                          decision=decision, ood_score=3.0 if decision == "REFER" else None,
                          in_intended_use=False if decision == "REFER" else None,
                          refer_reasons=[{"code": "out_of_distribution", "text": ""}] if decision == "REFER" else None)
    facts = facts_from(row, {})  # as after a restart: nothing but the row
    assert caption(facts)[1] == f"{headline}: probability 99.9% (threshold 99.8%)"
    sr = pydicom.dcmread(io.BytesIO(build_sr(_original(), facts, "1.2.3.4", "1.2.3.5", "pneumoscope", "1.2.3.6")))
    assert _codes(sr)["233604007"] == [{"REFER": "Indeterminate", "NORMAL": "Absent"}.get(decision or label,
                                                                                           "Present")]
