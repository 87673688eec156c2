"""Nothing accepted is lost and nothing is sent twice, against a real Orthanc: the PACS down while results are
written back (they arrive once it returns), the gateway restarted with results waiting (they are sent after the
restart), a PACS answering STOW-RS with 500 (retried), 409 (refused for good, counted, kept), or with an answer
that cannot be read (checked with QIDO-RS: stored, so not sent again). Films are sent with dcmtk's storescu.
"""

from __future__ import annotations

import pytest

from gateway_fixtures import (PDF, SC, SR, FaultyFront, chest_dx, running_orthanc, start_gateway, storescu, uids_of,
                              wait_until, write_film)
from webapp_fixtures import full_res_xrays

pytestmark = pytest.mark.integration


def _send(gateway, tmp_path, offset: int) -> str:
    film = chest_dx(full_res_xrays(1, offset=offset)[0], side=1200)
    sent = storescu(write_film(tmp_path, film, f"film-{offset}.dcm"), gateway.port)
    assert sent.returncode == 0, sent.stderr
    return uids_of(film)[0]


def test_results_wait_while_the_pacs_is_down_and_across_a_gateway_restart(transformer_url, tmp_path):
    home = tmp_path / "gateway-home"
    with running_orthanc() as pacs:
        gateway = start_gateway(home, transformer_url, send_to=pacs.dicomweb)
        try:
            pacs.stop()  # down during write-back
            first = _send(gateway, tmp_path, offset=10)
            wait_until(lambda: gateway.metric("pneumoscope_gateway_sent_total", kind="sr", outcome="retry") >= 2,
                       what="two failed sends")
            assert gateway.metric("pneumoscope_gateway_waiting", queue="to_send") == 3
            pacs.start()
            pacs.wait_for_classes(first, {SR, SC, PDF})
            pacs.stop()  # down again: the next film's results wait, and the gateway goes away too
            second = _send(gateway, tmp_path, offset=11)
            wait_until(lambda: gateway.metric("pneumoscope_gateway_waiting", queue="to_send") == 3,
                       what="three results waiting")
        finally:
            assert gateway.stop() == 0
        assert " ERROR " not in gateway.log_text(), "a PACS that is down is a warning, not an error"
        pacs.start()
        gateway = start_gateway(home, transformer_url, send_to=pacs.dicomweb)
        try:
            pacs.wait_for_classes(second, {SR, SC, PDF})
            for study in (first, second):
                assert len(pacs.qido_instances(study)) == 3, "each result once"
            wait_until(lambda: gateway.metric("pneumoscope_gateway_waiting", queue="to_send") == 0,
                       what="an empty outbox")
        finally:
            gateway.stop()


def test_a_gateway_killed_while_it_builds_the_sc_and_the_pdf_builds_them_after_a_restart(transformer_url, tmp_path):
    """SIGKILL after the SR is stored and while the other two are being built (slowed down by a test-only delay):
    the restarted gateway builds them again with their reserved UIDs once the build lease runs out; each result is
    in the PACS once."""
    import os
    import signal

    home = tmp_path / "gateway-home"
    with running_orthanc() as pacs:
        gateway = start_gateway(home, transformer_url, send_to=pacs.dicomweb, build_lease_s=3,
                                test_build_delay_s=30)
        try:
            study = _send(gateway, tmp_path, offset=12)
            pacs.wait_for_classes(study, {SR})
            assert set(pacs.sop_classes(study)) == {SR}  # the SC and the PDF are still being built
        finally:
            os.kill(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait(timeout=30)
        gateway = start_gateway(home, transformer_url, send_to=pacs.dicomweb, build_lease_s=3)
        try:
            pacs.wait_for_classes(study, {SR, SC, PDF})
            wait_until(lambda: gateway.metric("pneumoscope_gateway_waiting", queue="to_send") == 0,
                       what="an empty outbox")
            assert sorted(pacs.sop_classes(study)) == sorted([SR, SC, PDF]), "each result once"
            assert "built again and queued for the PACS" in gateway.log_text()
        finally:
            assert gateway.stop() == 0


def test_a_build_slower_than_its_lease_is_not_built_again_while_it_runs(transformer_url, tmp_path):
    """The SC and the PDF take three build leases to build (a test-only delay): the scorer renews their lease while
    they are built, so another gateway's claim (an outbox on the same database, in this test) finds nothing to
    build again the whole time; each result is built once and is in the PACS once."""
    import time

    from gateway.outbox import Outbox
    from gateway.settings import GatewaySettings
    from webapp.db import make_engine, session_factory
    from webapp.settings import WebSettings
    from webapp.storage import ImageStore

    home = tmp_path / "gateway-home"
    lease_s, build_s = 3.0, 9.0  # renewed every second: a second of slack for a busy machine
    with running_orthanc() as pacs:
        gateway = start_gateway(home, transformer_url, send_to=pacs.dicomweb, build_lease_s=lease_s,
                                test_build_delay_s=build_s)
        web = WebSettings(home=home, inference_url=transformer_url)
        engine = make_engine(web.resolved_database_url())
        other = Outbox(GatewaySettings(build_lease_s=lease_s), session_factory(engine),
                       ImageStore(web.resolved_image_store()), web.field_cipher(), sender=None)
        try:
            study = _send(gateway, tmp_path, offset=16)
            pacs.wait_for_classes(study, {SR})
            claimed, deadline = [], time.monotonic() + build_s + 60
            while set(pacs.sop_classes(study)) != {SR, SC, PDF} and time.monotonic() < deadline:
                claimed += other.claim_unbuilt(8)
                time.sleep(0.25)
            assert claimed == [], "a build still running was claimed by another gateway"
            pacs.wait_for_classes(study, {SR, SC, PDF})
            wait_until(lambda: gateway.metric("pneumoscope_gateway_waiting", queue="to_send") == 0,
                       what="an empty outbox")
            assert sorted(pacs.sop_classes(study)) == sorted([SR, SC, PDF]), "each result once"
            assert "built again" not in gateway.log_text()
        finally:
            engine.dispose()
            assert gateway.stop() == 0


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    with running_orthanc() as pacs:
        front = FaultyFront(pacs)
        try:
            yield pacs, front
        finally:
            front.close()


@pytest.fixture(scope="module")
def gateway_behind_front(faulty, transformer_url, tmp_path_factory):
    pacs, front = faulty
    gateway = start_gateway(tmp_path_factory.mktemp("gateway-home"), transformer_url, send_to=front.dicomweb)
    try:
        yield gateway
    finally:
        gateway.stop()


def test_stow_rs_500_is_tried_again_until_stored(faulty, gateway_behind_front, tmp_path):
    pacs, front = faulty
    front.plan[:] = ["500", "500"]
    study = _send(gateway_behind_front, tmp_path, offset=12)
    pacs.wait_for_classes(study, {SR, SC, PDF})
    assert front.posts[-5:].count("500") == 2 and len(pacs.qido_instances(study)) == 3
    assert "answered STOW-RS with 500" in gateway_behind_front.log_text()


def test_stow_rs_409_is_refused_for_good_counted_and_kept(faulty, gateway_behind_front, tmp_path):
    pacs, front = faulty
    gateway = gateway_behind_front
    refused = gateway.metric("pneumoscope_gateway_sent_total", kind="sr", outcome="refused")
    front.plan[:] = [("409", SR)]
    study = _send(gateway, tmp_path, offset=13)
    pacs.wait_for_classes(study, {SC, PDF})
    wait_until(lambda: gateway.metric("pneumoscope_gateway_sent_total", kind="sr", outcome="refused") == refused + 1,
               what="the refusal counted")
    wait_until(lambda: gateway.metric("pneumoscope_gateway_waiting", queue="refused") == 1,
               what="the refused result kept")
    assert "STOW-RS 409, failure reason 0xA900" in gateway.log_text()
    assert SR not in pacs.sop_classes(study) and gateway.process.poll() is None


def test_refused_results_are_sent_again_with_retry_refused(faulty, transformer_url, tmp_path):
    """After the admin fixed what the PACS refused: `pneumoscope gateway --retry-refused` queues them again."""
    pacs, front = faulty
    home = tmp_path / "gateway-home"
    gateway = start_gateway(home, transformer_url, send_to=front.dicomweb)
    try:
        front.plan[:] = [("409", SR)]
        study = _send(gateway, tmp_path, offset=15)
        wait_until(lambda: gateway.metric("pneumoscope_gateway_waiting", queue="refused") == 1,
                   what="the refused SR kept")
    finally:
        gateway.stop()
    gateway = start_gateway(home, transformer_url, args=["--retry-refused"], send_to=front.dicomweb)
    try:
        assert gateway.info["requeued"] == 1
        pacs.wait_for_classes(study, {SR, SC, PDF})
        assert len(pacs.qido_instances(study)) == 3
    finally:
        gateway.stop()


def test_an_unreadable_stow_rs_answer_is_checked_with_qido_and_not_sent_again(faulty, gateway_behind_front,
                                                                               tmp_path):
    pacs, front = faulty
    front.plan[:] = [("garbage", SR)]  # Orthanc stores the SR, the gateway gets "{not json"
    posts = len(front.posts)
    study = _send(gateway_behind_front, tmp_path, offset=14)
    pacs.wait_for_classes(study, {SR, SC, PDF})
    # The SR is in Orthanc before the gateway has checked it: wait for the check's verdict, then count the sends.
    wait_until(lambda: "QIDO-RS finds the instance stored" in gateway_behind_front.log_text(),
               what="the QIDO-RS check")
    wait_until(lambda: gateway_behind_front.metric("pneumoscope_gateway_waiting", queue="to_send") == 0,
               what="an empty outbox")
    assert len(front.posts) - posts == 3, "three objects, three sends: the SR was not sent again"
