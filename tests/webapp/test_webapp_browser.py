"""The doctor's view, in a real browser: Playwright driving Debian's Chromium against the web app that
``pneumoscope serve`` started beside the real predictor and transformer.

Each test signs in, uploads a real full-resolution X-ray, sees the probability and the heatmap drawn by the
viewer over the film, toggles the overlay, opens the report and gives feedback; the first does it all with the keyboard alone, the
second drops the file on the page and watches a pending study turn into a result without a reload.
Every page is checked for labelled controls and text contrast >= 4.5:1. Screenshots go to
test-artifacts/webapp/ (kept by CI as artefacts).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time

import pytest

from webapp_fixtures import ARTIFACTS, PASSWORD, full_res_xrays, predictor_pid

pytestmark = pytest.mark.integration

A11Y_SCRIPT = """() => {
  const problems = [];
  const visible = (el) => !el.closest('[hidden]') && el.getClientRects().length > 0;
  for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea, button')) {
    if (!visible(el)) continue;
    let name = '';
    if (el.id) { const label = document.querySelector(`label[for="${el.id}"]`); if (label) name = label.textContent; }
    if (!name && el.closest('label')) name = el.closest('label').textContent;
    if (!name) name = el.getAttribute('aria-label') || '';
    if (!name && el.getAttribute('aria-labelledby')) {
      const ref = document.getElementById(el.getAttribute('aria-labelledby')); name = ref ? ref.textContent : ''; }
    if (!name && el.tagName === 'BUTTON') name = el.textContent;
    if (!name.trim()) problems.push('no label: ' + el.outerHTML.slice(0, 100));
  }
  for (const img of document.querySelectorAll('img')) {
    if (visible(img) && !img.getAttribute('alt')) problems.push('no alt text: ' + img.outerHTML.slice(0, 100));
  }
  const rgba = (text) => {
    const m = text.match(/[\\d.]+/g).map(Number);
    return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1];
  };
  const channel = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (el) => {
    const layers = [];
    for (let node = el; node; node = node.parentElement) {
      const c = rgba(getComputedStyle(node).backgroundColor);
      if (c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    let out = [255, 255, 255];
    for (const c of layers.reverse()) out = out.map((v, i) => c[i] * c[3] + v * (1 - c[3]));
    return out;
  };
  let checked = 0;
  for (const el of document.querySelectorAll('body *')) {
    if (!visible(el) || ['SCRIPT', 'STYLE', 'IMG', 'svg'].includes(el.tagName)) continue;
    const text = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join('').trim();
    if (!text) continue;
    const fg = rgba(getComputedStyle(el).color), bg = background(el);
    const fgc = fg.slice(0, 3).map((v, i) => v * fg[3] + bg[i] * (1 - fg[3]));
    const [hi, lo] = [lum(fgc), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    checked++;
    if (ratio < 4.5) problems.push(`contrast ${ratio.toFixed(2)}:1 for "${text.slice(0, 40)}"`);
  }
  return {problems, checked};
}"""


def check_accessibility(page, name: str) -> None:
    result = page.evaluate(A11Y_SCRIPT)
    assert result["checked"] > 3, f"{name}: no text was checked"
    assert not result["problems"], f"{name}: " + "; ".join(result["problems"])


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def tab_to(page, element_id: str, most: int = 60) -> None:
    for _ in range(most):
        if page.evaluate("() => document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} cannot be reached with the Tab key")


def expect_result(page) -> None:
    page.wait_for_selector("#state-done", state="visible", timeout=120_000)
    assert re.fullmatch(r"\d{1,3}\.\d %", page.inner_text("#probability"))
    assert page.inner_text("#decision") in ("Pneumonia suspected", "No pneumonia detected",
                                            "Refer: no finding from the model")
    assert page.is_visible("#refer-explanation") == page.inner_text("#decision").startswith("Refer")
    assert page.inner_text("#model") == "pneumonia version local"
    # the viewer has drawn the film and the transformer's CAM over it
    page.wait_for_function("() => document.getElementById('viewer').dataset.ready === 'heat'", timeout=30_000)


def opacity(page) -> float:
    return float(page.evaluate("() => getComputedStyle(document.getElementById('heatmap')).opacity"))


#: Chromium keeps opacity as a float32 and serialises the computed value with 6 significant digits: a value
#: set from "0.4" reads back within half a unit of the sixth digit
OPACITY_READBACK = 5e-7


def test_keyboard_only_upload_result_heatmap_report_and_feedback(browser, web_stack):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    xray = full_res_xrays(1, offset=20)[0]
    try:
        page.goto(web_stack.web + "/")
        assert page.url.startswith(web_stack.web + "/login")
        check_accessibility(page, "sign-in page")
        shot(page, "01-sign-in")
        page.keyboard.type("doctor")  # the user name field has the focus
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url(web_stack.web + "/")
        check_accessibility(page, "upload page")
        shot(page, "02-upload")

        tab_to(page, "file")
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Space")  # the file picker opens from the keyboard
        chooser.value.set_files(str(xray))
        tab_to(page, "upload-button")
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r".*/studies/\d+$"), timeout=120_000)
        expect_result(page)
        check_accessibility(page, "result page")
        shot(page, "03-result")

        assert opacity(page) == 0.7  # the default opacity
        tab_to(page, "show-heatmap")
        page.keyboard.press("Space")
        assert opacity(page) == 0.0 and not page.is_checked("#show-heatmap")
        shot(page, "04-heatmap-off")
        page.keyboard.press("Space")
        tab_to(page, "heatmap-opacity")
        page.keyboard.press("Home")
        for _ in range(8):  # 0 -> 40 % in steps of 5
            page.keyboard.press("ArrowRight")
        assert abs(opacity(page) - 0.4) <= OPACITY_READBACK and page.inner_text("#opacity-value") == "40 %"
        shot(page, "05-heatmap-40")

        study_url = page.url
        page.click("text=Write the report")
        page.wait_for_selector("#print-button")
        check_accessibility(page, "report page")
        assert "does not replace" in page.inner_text(".statement")
        shot(page, "06-report")
        page.emulate_media(media="print")
        assert not page.is_visible(".topbar") and not page.is_visible("#print-button")
        shot(page, "07-report-print")
        page.emulate_media(media="screen")
        pdf = page.request.get(web_stack.web + page.get_attribute("text=Download PDF", "href"))
        assert pdf.headers["content-type"] == "application/pdf" and pdf.body().startswith(b"%PDF")

        page.goto(study_url)
        # a correction names the other label than the model's: the served answer may be a REFER, whose page shows
        # no label, so the label comes from the API (the page's session reads it)
        study_id = study_url.rsplit("/", 1)[1]
        model_label = page.request.get(f"{web_stack.web}/api/studies/{study_id}").json()["result"]["label"]
        right = "NORMAL" if model_label == "PNEUMONIA" else "PNEUMONIA"
        if page.query_selector("#refer-review") is None:
            tab_to(page, "verdict-confirmed")
            page.keyboard.press("ArrowDown")  # radio group: the arrow moves to "No, I correct it"
            assert page.is_checked("#verdict-corrected")
        # (a REFER page asks only for the doctor's reading: the label)
        tab_to(page, "correct-label")
        page.select_option("#correct-label", right)
        tab_to(page, "review-note")
        page.keyboard.type("Reviewed by keyboard")
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")
        page.wait_for_selector("text=Your review was saved.")
        assert f"corrected to {right}" in page.inner_text("#current-review")
        check_accessibility(page, "result page after review")
        shot(page, "08-review-saved")

        page.goto(web_stack.web + "/studies?q=keyboard")
        assert page.locator("table.studies tbody tr").count() == 1
        check_accessibility(page, "studies page")
        shot(page, "09-studies")
    finally:
        context.close()


def test_drop_upload_then_a_pending_study_updates_without_reload(browser, web_stack):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    xray = full_res_xrays(2, offset=21)[1]
    try:
        page.goto(web_stack.web + "/login")
        page.fill("#username", "doctor")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(web_stack.web + "/")
        payload = base64.b64encode(xray.read_bytes()).decode()
        page.evaluate("""([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
            const zone = document.getElementById('dropzone');
            zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""", [xray.name, payload])
        assert page.evaluate("() => document.getElementById('file').files.length") == 1
        assert xray.name in page.inner_text("#upload-status")

        os.kill(predictor_pid(web_stack), signal.SIGKILL)  # the stack restarts it after a few seconds
        time.sleep(0.3)
        page.click("#upload-button")
        page.wait_for_url(re.compile(r".*/studies/\d+$"), timeout=120_000)
        assert page.is_visible("#state-pending"), page.inner_text("#live")
        page.evaluate("() => { window.notReloaded = true; }")
        check_accessibility(page, "pending study page")
        shot(page, "10-pending")
        expect_result(page)
        assert page.evaluate("() => window.notReloaded === true"), "the page reloaded"
        assert not page.is_visible("#state-pending") and page.is_visible("#review")
        page.uncheck("#show-heatmap")
        assert opacity(page) == 0.0
        page.check("#show-heatmap")
        page.fill("#heatmap-opacity", "50")
        assert abs(opacity(page) - 0.5) <= OPACITY_READBACK
        shot(page, "11-live-result")
        page.click("text=Write the report")
        page.wait_for_selector("#print-button")
        page.go_back()
        agree_with_the_model(page)
        page.click("text=Save review")
        page.wait_for_selector("text=Your review was saved.")
        assert "confirmed" in page.inner_text("#current-review")
    finally:
        context.close()


def agree_with_the_model(page) -> None:
    """Fill the review so that it agrees with the model: confirm its finding, or, on a REFER page (no finding to
    confirm), give the label under the referral as the doctor's reading."""
    if page.query_selector("#refer-review") is None:
        page.check("#verdict-confirmed")
        return
    study_id = page.url.rstrip("/").rsplit("/", 1)[1]
    web = page.url.split("/studies/")[0]
    page.select_option("#correct-label", page.request.get(f"{web}/api/studies/{study_id}").json()["result"]["label"])
