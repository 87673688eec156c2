"""The DICOM gateway against a real PACS: Debian's Orthanc (DICOMweb plugin) started by the tests, dcmtk's
storescu sending real chest X-rays as 16-bit DX films of realistic size, the real transformer and predictor, and
the gateway as a real process. Needs the shared X-rays and `make deps-gateway` (orthanc, dcmtk, dicom3tools).
"""

from __future__ import annotations

import io
import subprocess

import httpx
import pydicom
import pytest

from gateway_fixtures import (PATIENT, PDF, SC, SR, c_store, chest_dx, dciodvfy, part10, running_orthanc,
                              start_gateway, storescu, study_count, uids_of, wait_until, write_film)
from webapp_fixtures import free_port, full_res_xrays

pytestmark = pytest.mark.integration
LIMIT = 12_000_000


@pytest.fixture(scope="module")
def pacs():
    with running_orthanc() as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def gateway(pacs, transformer_url, tmp_path_factory):
    # A size limit below the default (60 MB) so that "too large" costs one 14 MB film, not a 61 MB one.
    process = start_gateway(tmp_path_factory.mktemp("gateway-home"), transformer_url, send_to=pacs.dicomweb,
                            allowed_aes="MODALITY1,ORTHANC", max_object_bytes=LIMIT)
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
    wait_until(lambda: gateway.metric("pneumoscope_gateway_receipt_to_stored_seconds_count") >= 1,
               what="the receipt-to-stored time observed")  # once the last answer is read
    assert PATIENT["PatientID"] not in gateway.log_text() and film_uid not in gateway.log_text()


def _results_after(gateway, pacs, tmp_path, offset: int) -> str:
    """Send one more chest film and wait for its results: work queued before it has had its turn by then."""
    film = chest_dx(full_res_xrays(1, offset=offset)[0], side=1200)
    assert storescu(write_film(tmp_path, film, "marker.dcm"), gateway.port).returncode == 0
    study_uid = uids_of(film)[0]
    pacs.wait_for_classes(study_uid, {SR, SC, PDF})
    return study_uid


def test_a_ct_a_non_chest_dx_and_a_lateral_film_are_acknowledged_counted_and_left_alone(gateway, pacs, tmp_path):
    before = {r: gateway.metric("pneumoscope_gateway_received_total", outcome=f"ignored_{r}")
              for r in ("modality", "body_part", "view")}
    studies = study_count(gateway.home)
    ct, hand = chest_dx(side=512, modality="CT"), chest_dx(side=512, body_part="HAND")
    lateral = chest_dx(side=512, ViewPosition="LL")
    for name, data in (("ct.dcm", ct), ("hand.dcm", hand), ("lateral.dcm", lateral)):
        sent = storescu(write_film(tmp_path, data, name), gateway.port)
        assert sent.returncode == 0 and "Success" in sent.stderr, sent.stderr  # acknowledged
    after = {r: gateway.metric("pneumoscope_gateway_received_total", outcome=f"ignored_{r}") for r in before}
    assert after == {r: before[r] + 1 for r in before}
    _results_after(gateway, pacs, tmp_path, offset=3)
    assert study_count(gateway.home) == studies + 1, "only the chest film was recorded"
    for data in (ct, hand, lateral):
        assert pacs.qido_instances(uids_of(data)[0]) == [], "nothing was sent back for what the gateway ignored"
    assert "modality CT is not CR or DX" in gateway.log_text() and "body part HAND is not CHEST" in gateway.log_text()
    assert "view LL is not frontal" in gateway.log_text()


def test_the_same_film_sent_twice_gives_one_result(gateway, pacs, tmp_path):
    film = chest_dx(full_res_xrays(1, offset=5)[0], side=1500)
    study_uid = uids_of(film)[0]
    path = write_film(tmp_path, film)
    duplicates = gateway.metric("pneumoscope_gateway_received_total", outcome="duplicate")
    assert storescu(path, gateway.port).returncode == 0
    pacs.wait_for_classes(study_uid, {SR, SC, PDF})
    studies = study_count(gateway.home)
    again = storescu(path, gateway.port)
    assert again.returncode == 0 and "Success" in again.stderr, again.stderr
    assert gateway.metric("pneumoscope_gateway_received_total", outcome="duplicate") == duplicates + 1
    _results_after(gateway, pacs, tmp_path, offset=6)
    assert len(pacs.qido_instances(study_uid)) == 3 and study_count(gateway.home) == studies + 1


def test_a_calling_ae_title_not_allowed_is_rejected_at_association(gateway, tmp_path):
    rejected = gateway.metric("pneumoscope_gateway_associations_total", outcome="rejected")
    sent = storescu(write_film(tmp_path, chest_dx(side=512)), gateway.port, calling="INTRUDER")
    assert sent.returncode != 0
    assert "Association Rejected" in sent.stderr or "rejected" in sent.stderr.lower(), sent.stderr
    wait_until(lambda: gateway.metric("pneumoscope_gateway_associations_total", outcome="rejected") == rejected + 1,
               what="the rejection counted")
    assert "association from INTRUDER" in gateway.log_text()
    echo = subprocess.run(["echoscu", "-aet", "MODALITY1", "-aec", "PNEUMOSCOPE", "127.0.0.1", str(gateway.port)],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr  # an allowed AE is answered (C-ECHO)


def _rle_bomb():
    """A DX whose RLE segment decompresses to 25 times the 64 x 64 image it declares."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "DX"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    segment = bytes([0x81, 0x00]) * 800  # each pair: 128 zero bytes
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)
    ds.PixelData = encapsulate([header + segment])
    ds["PixelData"].VR = "OB"
    return part10(ds, RLELossless)


def _variants():
    from pydicom.uid import JPEGLSLossless

    import pydicom

    small = pydicom.dcmread(io.BytesIO(chest_dx(side=256)))
    no_pixels = pydicom.dcmread(io.BytesIO(chest_dx(side=256)))
    del no_pixels.PixelData
    jpeg_ls = pydicom.dcmread(io.BytesIO(chest_dx(side=256)))
    jpeg_ls.compress(JPEGLSLossless)
    garbage = bytearray(part10(small))
    meta_end = 132 + 12 + int.from_bytes(garbage[140:144], "little")  # preamble, DICM, group length element
    garbage[meta_end:] = b"This is a scanned letter, not a DICOM data set.\n" * 200  # valid file meta, then text
    return {"not_dicom": bytes(garbage), "no_pixel_data": part10(no_pixels), "transfer_syntax": part10(jpeg_ls),
            "rle_bomb": _rle_bomb(), "too_large": chest_dx(side=3000)}


@pytest.mark.parametrize("case, status, outcome, words", [
    ("not_dicom", 0xC000, "refused_not_dicom", "cannot be read"),
    ("no_pixel_data", 0xC000, "refused_no_pixel_data", "no pixel data"),
    ("transfer_syntax", 0xC000, "refused_transfer_syntax", "JPEG-LS Lossless"),
    ("rle_bomb", 0xC000, "refused_too_large", "decompresses to more"),
    ("too_large", 0xA700, "refused_too_large", f"at most {LIMIT}"),
])
def test_bad_input_gets_a_failure_status_with_a_reason_and_nothing_is_kept(gateway, tmp_path, case, status,
                                                                          outcome, words):
    data = _variants()[case]
    studies = study_count(gateway.home)
    count = gateway.metric("pneumoscope_gateway_received_total", outcome=outcome)
    got, comment = c_store(write_film(tmp_path, data, f"{case}.dcm"), gateway.port)
    assert (got, words in comment or words in gateway.log_text()) == (status, True), (hex(got), comment)
    assert gateway.metric("pneumoscope_gateway_received_total", outcome=outcome) == count + 1
    assert study_count(gateway.home) == studies, "a refused object leaves nothing behind"
    assert gateway.process.poll() is None


def test_a_multi_frame_object_is_acknowledged_counted_and_not_scored(gateway, tmp_path):
    studies = study_count(gateway.home)
    count = gateway.metric("pneumoscope_gateway_received_total", outcome="ignored_multiframe")
    got, _ = c_store(write_film(tmp_path, chest_dx(side=256, frames=3)), gateway.port)
    assert got == 0x0000
    assert gateway.metric("pneumoscope_gateway_received_total", outcome="ignored_multiframe") == count + 1
    assert "multi-frame object (3 frames)" in gateway.log_text() and study_count(gateway.home) == studies
