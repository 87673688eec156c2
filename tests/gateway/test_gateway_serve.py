"""`pneumoscope serve --gateway-port P` starts the DICOM gateway beside the stack: a film sent with storescu to
127.0.0.1:P is scored, shows in the web app's list as a PACS study, and its results reach the PACS that
PNEUMOSCOPE_GATEWAY_SEND_TO names (a real Orthanc)."""

from __future__ import annotations

import os
import signal

import pytest

from gateway_fixtures import PDF, SC, SR, chest_dx, running_orthanc, storescu, study_count, uids_of, write_film
from serving_fixtures import free_port_pair, serve_until_ready, shared_bundle
from webapp_fixtures import free_port, full_res_xrays

pytestmark = pytest.mark.integration


def test_serve_starts_the_gateway_beside_the_stack(tmp_path):
    from model.bundle import Bundle

    bundle, _ = shared_bundle()
    port, gateway_port = free_port_pair(), free_port()
    with running_orthanc() as pacs:
        home = tmp_path / "home"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PNEUMOSCOPE_")},
               "PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_THREADS": "2", "PNEUMOSCOPE_ENGINE": "onnxruntime",
               "PNEUMOSCOPE_GATEWAY_SEND_TO": pacs.dicomweb, "PNEUMOSCOPE_SECRET_KEY": "serve-test"}
        process, info = serve_until_ready(["--model", str(bundle), "--sha256", Bundle.load(bundle, verify=False).sha256,
                                           "--port", str(port), "--gateway-port", str(gateway_port)],
                                          env, tmp_path, tmp_path / "stack.log")
        try:
            assert info["gateway"]["dicom"] == f"127.0.0.1:{gateway_port}"
            assert info["gateway"]["ae_title"] == "PNEUMOSCOPE"
            film = chest_dx(full_res_xrays(1, offset=40)[0], side=1200)
            assert storescu(write_film(tmp_path, film), gateway_port).returncode == 0
            pacs.wait_for_classes(uids_of(film)[0], {SR, SC, PDF})
            assert study_count(home) == 1
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(90) == 0
