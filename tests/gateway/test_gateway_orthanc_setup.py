"""The documented Orthanc set-ups work with the real Orthanc: docs/platform/pacs/orthanc-pneumoscope.json (the
gateway as a modality) with pneumoscope-forward.lua (auto-forwarding of CR/DX), results back by C-STORE; and pull
mode (`pneumoscope gateway --pull URL`: QIDO-RS + WADO-RS), results back by STOW-RS.
"""

from __future__ import annotations

import pytest

from gateway_fixtures import (EXAMPLES, ORTHANC_AET, PDF, SC, SR, chest_dx, running_orthanc, start_gateway, uids_of,
                              wait_until)
from webapp_fixtures import free_port, full_res_xrays

pytestmark = pytest.mark.integration


def test_the_documented_lua_script_forwards_a_dx_and_the_results_come_back_by_c_store(transformer_url, tmp_path):
    port = free_port()
    with running_orthanc(gateway_port=port, lua=EXAMPLES / "pneumoscope-forward.lua", example=True) as pacs:
        assert pacs.config["DicomModalities"]["pneumoscope"][0] == "PNEUMOSCOPE"  # the documented entry
        gateway = start_gateway(tmp_path / "home", transformer_url, port=port, allowed_aes=ORTHANC_AET,
                                send_to=f"dicom://{ORTHANC_AET}@127.0.0.1:{pacs.dicom_port}")
        try:
            film = chest_dx(full_res_xrays(1, offset=20)[0], side=1200)
            ct = chest_dx(side=256, modality="CT")
            pacs.upload(ct)  # not CR/DX: the script does not forward it
            pacs.upload(film)  # stored in the PACS -> the script sends it to the gateway
            found = pacs.wait_for_classes(uids_of(film)[0], {SR, SC, PDF})
            assert len(found) == 4, "the film and its three results"
            assert gateway.metric("pneumoscope_gateway_received_total", outcome="accepted") == 1
            assert gateway.metric("pneumoscope_gateway_received_total", outcome="ignored_modality") == 0
            wait_until(lambda: gateway.metric("pneumoscope_gateway_sent_total", kind="sr", outcome="stored") == 1,
                       what="the SR counted as stored")  # counted once the PACS's answer is read
        finally:
            gateway.stop()


def test_pull_mode_fetches_new_cr_and_dx_films_once_and_sends_results_back(transformer_url, tmp_path):
    with running_orthanc() as pacs:
        film = chest_dx(full_res_xrays(1, offset=21)[0], side=1200, modality="CR")
        pacs.upload(film)
        pacs.upload(chest_dx(side=256, modality="CT"))
        gateway = start_gateway(tmp_path / "home", transformer_url, args=["--pull", pacs.dicomweb],
                                pull_interval_s=0.5)
        try:
            pacs.wait_for_classes(uids_of(film)[0], {SR, SC, PDF})
            polls = gateway.metric("pneumoscope_gateway_polls_total", outcome="ok")
            wait_until(lambda: gateway.metric("pneumoscope_gateway_polls_total", outcome="ok") >= polls + 2,
                       what="two more polls")
            assert gateway.metric("pneumoscope_gateway_received_total", outcome="accepted") == 1, "fetched once"
            assert gateway.metric("pneumoscope_gateway_received_total", outcome="ignored_modality") == 0, \
                "QIDO-RS asks for CR and DX only"
            assert len(pacs.qido_instances(uids_of(film)[0])) == 4
        finally:
            gateway.stop()
