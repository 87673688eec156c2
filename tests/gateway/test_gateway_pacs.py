"""The DICOM gateway against a real PACS: Debian's Orthanc (DICOMweb plugin) started by the tests, dcmtk's
storescu sending real chest X-rays as 16-bit DX films of realistic size, the real transformer and predictor, and
the gateway as a real process. Needs the shared X-rays and `make deps-gateway` (orthanc, dcmtk, dicom3tools).
"""

from __future__ import annotations

import io

import httpx
import pydicom
import pytest

from gateway_fixtures import (PATIENT, PDF, SC, SR, chest_dx, dciodvfy, running_orthanc, start_gateway, storescu,
                              uids_of, wait_until, write_film)
from webapp_fixtures import free_port, full_res_xrays

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pacs():
    with running_orthanc() as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def gateway(pacs, transformer_url, tmp_path_factory):
    process = start_gateway(tmp_path_factory.mktemp("gateway-home"), transformer_url, send_to=pacs.dicomweb,
                            allowed_aes="MODALITY1,ORTHANC")
    try:
        yield process
    finally:
        process.stop()


def test_a_film_sent_with_storescu_gets_sr_sc_and_pdf_in_its_own_study(gateway, pacs, tmp_path):
    film = chest_dx(full_res_xrays(1)[0])
    assert 9_000_000 < len(film) < 30_000_000, "a realistic 16-bit DX film"
    study_uid, film_uid = uids_of(film)
    sent = storescu(write_film(tmp_path, film), gateway.port)
    assert sent.returncode == 0, sent.stderr
    found = pacs.wait_for_classes(study_uid, {SR, SC, PDF}, timeout=120)
    assert len(found) == 3, "one SR, one Secondary Capture and one PDF: nothing twice"
    for item in found:
        assert "NOT FOR DIAGNOSTIC USE" in item["0008103E"]["Value"][0]
    objects = {item["00080016"]["Value"][0]: pacs.instance_file(item["00080018"]["Value"][0]) for item in found}
    for sop_class, data in objects.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.StudyInstanceUID == study_uid
        assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (
            PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"])
    sr = pydicom.dcmread(io.BytesIO(objects[SR]))
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    report = dciodvfy(objects[SR], tmp_path, "sr.dcm")
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
    report = dciodvfy(objects[SC], tmp_path, "sc.dcm")
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
    pdf = pydicom.dcmread(io.BytesIO(objects[PDF]))
    assert bytes(pdf.EncapsulatedDocument).startswith(b"%PDF")
    assert gateway.metric("pneumoscope_gateway_received_total", outcome="accepted") >= 1
    assert gateway.metric("pneumoscope_gateway_receipt_to_stored_seconds_count") >= 1
    assert PATIENT["PatientID"] not in gateway.log_text() and film_uid not in gateway.log_text()
