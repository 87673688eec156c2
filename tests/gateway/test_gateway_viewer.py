"""A film sent with storescu shows its heatmap (the Secondary Capture) in Orthanc's own web viewer
(orthanc-webviewer), in a real browser (Playwright driving Debian's Chromium); the SR's content, read through
Orthanc's REST API (that viewer does not render SRs), states what the gateway recorded for the film.
Screenshots go to test-artifacts/gateway/.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from conftest import REPO
from gateway_fixtures import SC, SR, PDF, chest_dx, running_orthanc, start_gateway, storescu, uids_of, write_film
from webapp_fixtures import CHROMIUM, CHROMIUM_FLAGS, full_res_xrays

pytestmark = pytest.mark.integration
ARTIFACTS = REPO / "test-artifacts" / "gateway"

#: The viewer draws on a canvas: count its pixels that are bright and coloured (the heatmap's colours, the
#: burned-in white text), so that a black or grey canvas (nothing loaded, or the film alone) does not pass.
CANVAS_SCRIPT = """() => {
  let best = {coloured: 0, bright: 0, total: 0};
  for (const canvas of document.querySelectorAll('canvas')) {
    if (!canvas.width || !canvas.height) continue;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let coloured = 0, bright = 0;
    for (let i = 0; i < data.length; i += 4) {
      const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
      if (Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
      if (r + g + b > 600) bright++;
    }
    if (coloured > best.coloured) best = {coloured, bright, total: data.length / 4};
  }
  return best;
}"""


def _content(items: list, found: dict) -> dict:
    """The SR's content tree (Orthanc's simplified JSON) as {concept code: value}, depth first."""
    for item in items or []:
        code = (item.get("ConceptNameCodeSequence") or [{}])[0].get("CodeValue")
        if item.get("MeasuredValueSequence"):
            found[code] = float(item["MeasuredValueSequence"][0]["NumericValue"])
        elif item.get("ConceptCodeSequence"):
            found.setdefault(code, item["ConceptCodeSequence"][0]["CodeMeaning"])
        elif "TextValue" in item:
            found.setdefault(code, item["TextValue"])
        _content(item.get("ContentSequence"), found)
    return found


def test_the_heatmap_shows_in_orthancs_web_viewer_and_the_sr_states_the_result(transformer_url, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run `make deps-web` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_orthanc() as pacs:
        gateway = start_gateway(tmp_path / "home", transformer_url, send_to=pacs.dicomweb)
        try:
            film = chest_dx(full_res_xrays(1, offset=30)[0])
            assert storescu(write_film(tmp_path, film), gateway.port).returncode == 0
            found = pacs.wait_for_classes(uids_of(film)[0], {SR, SC, PDF})
        finally:
            gateway.stop()
        uid_of = {item["00080016"]["Value"][0]: item["00080018"]["Value"][0] for item in found}

        # The SR, through Orthanc's REST API, against the study the gateway recorded.
        sr_id = pacs.orthanc_id(uid_of[SR])
        tags = httpx.get(f"{pacs.url}/instances/{sr_id}/tags?simplify", timeout=30).json()
        content = _content(tags["ContentSequence"], {})
        with closing(sqlite3.connect(tmp_path / "home" / "webapp.db")) as db:
            probability, threshold, label, decision, version = db.execute(
                "SELECT probability, threshold, label, decision, model_version FROM studies WHERE source = 'PACS'"
            ).fetchone()
        assert tags["VerificationFlag"] == "UNVERIFIED"
        assert content["P-PROB"] == pytest.approx(probability, abs=1e-6)
        assert content["P-THR"] == pytest.approx(threshold, abs=1e-6)
        # finding: pneumonia, as the served decision has it (a REFER is indeterminate, whatever the label)
        served = decision or label
        assert content["233604007"] == {"PNEUMONIA": "Present", "NORMAL": "Absent", "REFER": "Indeterminate"}[served]
        if decision:
            assert content["P-DEC"] == decision
        assert content["111001"] == "pneumonia" and content["111003"] == version  # algorithm name and version
        from model.bundle import Bundle
        from serving_fixtures import shared_bundle

        digest = Bundle.load(shared_bundle()[0], verify=False).sha256  # the bundle the transformer's stack serves
        assert content["111002"] == f"sha256:{digest}"  # algorithm parameters: the digest

        # The Secondary Capture, in Orthanc's web viewer.
        series = httpx.get(f"{pacs.url}/instances/{pacs.orthanc_id(uid_of[SC])}", timeout=30).json()["ParentSeries"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(f"{pacs.url}/web-viewer/app/viewer.html?series={series}", wait_until="networkidle")
                page.wait_for_function(f"() => ({CANVAS_SCRIPT})().coloured > 10000", timeout=60_000)
                drawn = page.evaluate(CANVAS_SCRIPT)
                page.screenshot(path=str(ARTIFACTS / "orthanc-web-viewer-heatmap.png"))
            finally:
                browser.close()
        assert drawn["coloured"] > 0.05 * drawn["total"], drawn  # the heatmap's colours fill the picture
        assert drawn["bright"] > 500, drawn  # the burned-in text
