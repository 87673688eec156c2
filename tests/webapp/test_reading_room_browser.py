"""The reading room in a real browser (Playwright driving Debian's Chromium): the film viewer, the heatmap over it,
the keyboard, the dark theme, the explanation of REFER and of the intended use, and the report's sign-off.

The web app runs as its own process on SQLite with no transformer: each study is uploaded through the API and
given its result through the storage layer (``store_result``), so that the page shows a REFER, a film outside
the intended use, a demonstration model, or a CAM whose hot spot lies exactly where a mark was planted on the
film. What the transformer computes is tested with the real stack in test_webapp_browser.py and
test_reading_room_api.py. Pixels are read back from the canvases the viewer draws on. Screenshots go to
test-artifacts/webapp/ (reading-room-*.png).
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pytest

from webapp_fixtures import (ARTIFACTS, api_token, cam_grid, dicom_16bit, film_with_marker, full_res_xrays,
                             start_web, store_result)

pytestmark = pytest.mark.integration

PASSWORD = "a-long-test-password"
DEMO = {"profile": "demo", "demonstration": True, "refer_band": [0.35, 0.65],
        "heldout": {"auc": 0.912, "sensitivity": 0.88, "specificity": 0.79, "n": 400}}
# A synthetic film (the app checks the format only; the X-ray gate is the transformer's): mid grey with one white
# square centred on CAM cell (row 2, column 5) of an 8 x 8 grid. 960 x 720 px: cells of 120 x 90 px, so the
# cell's centre is film pixel (660, 225); the square covers pixels 650..669 x 215..234 (centroid 660, 225).
FILM_W, FILM_H, CELL = 960, 720, (2, 5)
MARK_CENTRE = (660.0, 225.0)


def synthetic_film() -> bytes:
    from PIL import Image

    gray = np.full((FILM_H, FILM_W), 110, np.uint8)
    gray[215:235, 650:670] = 255
    out = io.BytesIO()
    Image.fromarray(gray).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """A web app process with no transformer (studies stay pending until a test gives them a result)."""
    import httpx

    home = tmp_path_factory.mktemp("reading-room")
    env = {"PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_INFERENCE_URL": "http://127.0.0.1:9",
           "PNEUMOSCOPE_SECRET_KEY": "reading-room", "PNEUMOSCOPE_INLINE_WAIT_S": "2",
           "PNEUMOSCOPE_RETRY_INITIAL_S": "3600", "PNEUMOSCOPE_RETRY_MAX_S": "3600"}
    token = api_token(env, "doctor", PASSWORD)
    web = start_web(env, home / "web.log")
    client = httpx.Client(base_url=web.url, headers={"authorization": f"Bearer {token}"}, timeout=60)

    def study(data: bytes, name: str = "film.png", mime: str = "image/png", identity: dict | None = None,
              **result) -> int:
        response = client.post("/api/studies", files={"file": (name, data, mime)}, data=identity or {})
        assert response.status_code == 202, response.text  # no transformer: stored, pending
        study_id = response.json()["id"]
        if result:
            store_result(env, study_id, **result)
        return study_id

    try:
        yield {"url": web.url, "env": env, "study": study, "api": client}
    finally:
        client.close()
        web.stop()


@pytest.fixture
def page(browser, room):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(room["url"] + "/login")
    page.fill("#username", "doctor")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(room["url"] + "/")
    yield page
    context.close()
    assert not errors, errors


def open_study(page, room, study_id: int, ready: str = "heat") -> None:
    page.goto(f"{room['url']}/studies/{study_id}")
    page.wait_for_function(f"() => document.getElementById('viewer').dataset.ready === '{ready}'", timeout=30_000)
    settle(page)


def settle(page) -> None:
    """Wait for the viewer's next painted frame."""
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


def snapshot(page, canvas: str = "film-canvas") -> str:
    settle(page)
    return hashlib.sha256(page.evaluate(f"() => document.getElementById('{canvas}').toDataURL()").encode()).hexdigest()


def state(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.pneumoscopeViewer.state))")


def shot(page, name: str, full_page: bool = True) -> None:
    page.wait_for_function("() => [...document.images].every((i) => i.complete)")
    page.screenshot(path=str(ARTIFACTS / f"reading-room-{name}.png"), full_page=full_page)


CENTROID = """([id, test]) => {
  const canvas = document.getElementById(id);
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0, sx = 0, sy = 0;
  for (let y = 0; y < canvas.height; y++) for (let x = 0; x < canvas.width; x++) {
    const i = (y * canvas.width + x) * 4;
    const hit = test === 'white' ? data[i] === 255 && data[i + 1] === 255 && data[i + 2] === 255 : data[i + 3] > 0;
    if (hit) { n++; sx += x + 0.5; sy += y + 0.5; }
  }
  const dpr = window.devicePixelRatio || 1;
  return n ? [sx / n / dpr, sy / n / dpr, n] : null;
}"""


# -- the viewer ------------------------------------------------------------------------------------------------

def test_zoom_pan_and_window_level_change_the_pixels_drawn(page, room):
    film = full_res_xrays(1, offset=50)[0]
    study = room["study"](film.read_bytes(), film.name, "image/jpeg", probability=0.8, label="PNEUMONIA",
                          decision="PNEUMONIA", cam=cam_grid(7, 7, {(3, 2): 1.0}))
    open_study(page, room, study)
    first = snapshot(page)
    viewport = page.locator("#viewport").bounding_box()
    centre = (viewport["x"] + viewport["width"] / 2, viewport["y"] + viewport["height"] / 2)

    page.mouse.move(*centre)
    for _ in range(4):
        page.mouse.wheel(0, -100)  # the wheel zooms about the pointer
    zoomed = snapshot(page)
    assert zoomed != first and state(page)["scale"] > 1.5 * page.evaluate("() => pneumoscopeViewer.fitScale()")
    page.mouse.down()
    page.mouse.move(centre[0] + 120, centre[1] + 60, steps=6)
    page.mouse.up()
    panned = snapshot(page)
    assert panned not in (first, zoomed) and state(page)["tx"] != 0
    before = state(page)
    page.mouse.move(*centre)
    page.mouse.down(button="right")  # right-drag: window/level
    page.mouse.move(centre[0] - 150, centre[1] + 80, steps=6)
    page.mouse.up(button="right")
    windowed = snapshot(page)
    after = state(page)
    assert windowed != panned and after["width"] < before["width"] and after["center"] < before["center"]
    assert page.inner_text("#hud-wl") != "W 255 L 128"
    shot(page, "01-zoomed-panned-windowed")
    page.select_option("#wl-preset", "narrow")
    assert snapshot(page) != windowed
    page.click("[data-action=invert]")
    assert state(page)["invert"] is True
    page.click("[data-action=reset]")
    assert snapshot(page) == first, "reset does not restore the first view"


def test_dicom_window_level_works_on_the_original_bit_depth(page, room):
    """A 12-bit film holds detail (a ramp of 16 values in each 16-pixel run) that its 8-bit rendering cannot:
    a narrow window shows it on the canvas; the file's own window is the default, MONOCHROME1 starts inverted."""
    source = full_res_xrays(1, offset=51)[0]
    study = room["study"](dicom_16bit(source, window=(1500, 2000)), "film.dcm", "application/dicom",
                          cam=cam_grid(7, 7, {(3, 3): 1.0}))
    open_study(page, room, study)
    display = room["api"].get(f"/api/studies/{study}").json()["display"]
    assert state(page)["center"] == pytest.approx(display["window_center"])
    assert state(page)["width"] == pytest.approx(display["window_width"])
    # one 16-pixel run in the middle of the film, as stored and as the viewer holds it
    row, start = display["height"] // 2, (display["width"] // 32) * 16
    values = page.evaluate(f"() => Array.from(pneumoscopeViewer.film.values.slice({row * display['width'] + start},"
                           f" {row * display['width'] + start + 16}))")
    assert values == sorted(values) and values[-1] - values[0] == 15  # the ramp, in 16 bits
    page.evaluate(f"() => pneumoscopeViewer.setWindow({(values[0] + values[-1]) / 2}, 32)")
    settle(page)
    drawn = page.evaluate(f"""() => {{
        const c = pneumoscopeViewer.filmBuffer.getContext('2d');
        return Array.from(c.getImageData({start}, {row}, 16, 1).data).filter((_, i) => i % 4 === 0); }}""")
    assert len(set(drawn)) >= 12, drawn  # the narrow window spreads the 16 values over the grey scale
    from PIL import Image

    preview = np.asarray(Image.open(io.BytesIO(room["api"].get(f"/api/studies/{study}/image",
                                                               params={"variant": "display"}).content)))
    scale = preview.shape[1] / display["width"]
    run = preview[int(row * scale), int(start * scale):int((start + 16) * scale)]
    assert len(set(run.tolist())) <= 3, run  # the 8-bit rendering has no room for them
    shot(page, "02-dicom-16-bit")

    inverted = room["study"](dicom_16bit(source, monochrome1=True), "film1.dcm", "application/dicom",
                             cam=cam_grid(7, 7, {(3, 3): 1.0}))
    open_study(page, room, inverted)
    assert state(page)["invert"] is True and "inverted" in page.inner_text("#hud-wl")


def test_the_heatmap_stays_aligned_with_the_film_at_1x_and_4x(page, room):
    study = room["study"](synthetic_film(), probability=0.9, label="PNEUMONIA", decision="PNEUMONIA",
                          cam=cam_grid(8, 8, {CELL: 1.0}))
    open_study(page, room, study)
    page.fill("#heat-cutoff", "90")  # only the peak is coloured: its centroid is the cell's centre
    page.dispatch_event("#heat-cutoff", "input")
    for zoom in (1, 4):
        if zoom == 4:
            x, y = page.evaluate(f"() => pneumoscopeViewer.filmToScreen({MARK_CENTRE[0]}, {MARK_CENTRE[1]})")
            page.evaluate(f"() => pneumoscopeViewer.zoomTo(pneumoscopeViewer.fitScale() * 4, {x}, {y})")
        settle(page)
        scale = state(page)["scale"]
        expected = page.evaluate(f"() => pneumoscopeViewer.filmToScreen({MARK_CENTRE[0]}, {MARK_CENTRE[1]})")
        film = page.evaluate(CENTROID, ["film-canvas", "white"])
        heat = page.evaluate(CENTROID, ["heatmap", "alpha"])
        # each centroid within half a film pixel (rounding of the square's and the peak's edges) plus one
        # screen pixel of the expected point; so the two are within twice that of each other
        tolerance = scale * 0.5 + 1.0
        for found in (film, heat):
            assert found is not None and abs(found[0] - expected[0]) <= tolerance \
                and abs(found[1] - expected[1]) <= tolerance, (zoom, scale, expected, film, heat)
        shot(page, f"03-aligned-{zoom}x")


def test_a_heatmap_outside_the_lungs_shows_a_low_lung_share_and_the_lung_view_removes_it(page, room):
    """The display side of the planted-marker test: the model's evidence is a mark under the diaphragm, in a
    corner; the page says how little of the heatmap is inside the lungs, and the lung-field view clears it."""
    source = full_res_xrays(1, offset=52)[0]
    marked = film_with_marker(source, (0.88, 0.02, 0.98, 0.12))
    study = room["study"](marked, probability=0.97, label="PNEUMONIA", decision="PNEUMONIA",
                          cam=cam_grid(8, 8, {(7, 0): 1.0, (6, 0): 0.5}))
    open_study(page, room, study)
    share = page.inner_text("#lung-share")
    percent = int(re.match(r"(\d+) % of the heatmap inside the lungs", share).group(1))
    assert percent < 10, share
    assert "lung-field prior" in share and "inside the lungs" in page.inner_text("#hud-heat")
    raw = page.evaluate(CENTROID, ["heatmap", "alpha"])
    assert raw is not None and raw[2] > 100  # the corner is coloured in the raw view
    shot(page, "04-evidence-outside-the-lungs")
    page.check("#heat-lungs")
    settle(page)
    assert page.evaluate(CENTROID, ["heatmap", "alpha"]) is None  # nothing of it lies in the lung fields
    page.keyboard.press("Escape")
    page.focus("#viewport")
    page.keyboard.press("l")
    settle(page)
    assert page.is_checked("#heat-raw") and page.evaluate(CENTROID, ["heatmap", "alpha"]) is not None


# -- the keyboard ------------------------------------------------------------------------------------------------

KEYS = [  # key, what must change in the viewer's state (or on the page)
    ("+", lambda a, b: b["scale"] > a["scale"]),
    ("-", lambda a, b: b["scale"] < a["scale"]),
    ("ArrowLeft", lambda a, b: b["tx"] > a["tx"]),
    ("ArrowUp", lambda a, b: b["ty"] > a["ty"]),
    ("ArrowRight", lambda a, b: b["tx"] < a["tx"]),
    ("ArrowDown", lambda a, b: b["ty"] < a["ty"]),
    ("Shift+ArrowLeft", lambda a, b: b["width"] < a["width"]),
    ("Shift+ArrowRight", lambda a, b: b["width"] > a["width"]),
    ("Shift+ArrowUp", lambda a, b: b["center"] < a["center"]),
    ("Shift+ArrowDown", lambda a, b: b["center"] > a["center"]),
    ("v", lambda a, b: b["preset"] != a["preset"]),
    ("i", lambda a, b: b["invert"] != a["invert"]),
    ("w", lambda a, b: b["dragMode"] != a["dragMode"]),
    ("h", lambda a, b: b["heat"]["show"] != a["heat"]["show"]),
    ("l", lambda a, b: b["heat"]["view"] != a["heat"]["view"]),
    ("1", lambda a, b: b["scale"] == 1),
    ("0", lambda a, b: b["fitted"] and not a["fitted"]),
    ("r", lambda a, b: b["fitted"] and b["preset"] == "default" and not b["invert"]),
]


def test_every_viewer_action_has_a_shortcut_and_works_by_keyboard(page, room):
    film = full_res_xrays(1, offset=53)[0]
    study = room["study"](film.read_bytes(), film.name, "image/jpeg", cam=cam_grid(7, 7, {(3, 2): 1.0}))
    open_study(page, room, study)
    listed = {k.replace("−", "-").lower() for k in page.eval_on_selector_all("#shortcuts kbd",
                                                                              "(keys) => keys.map((k) => k.textContent)")}
    for button in page.locator("[data-action]").all():
        key = button.get_attribute("aria-keyshortcuts")
        assert key, f"{button.inner_text()} has no shortcut"
        assert key.lower() in listed, f"{key} is not in the list of shortcuts on the page"
    for control in ("#show-heatmap", "#heat-lungs", "#drag-mode", "#invert-button"):
        assert page.get_attribute(control, "aria-keyshortcuts"), control

    page.goto(f"{room['url']}/studies/{study}")
    page.wait_for_function("() => document.getElementById('viewer').dataset.ready === 'heat'")
    for _ in range(40):  # the film is reached with the Tab key
        if page.evaluate("() => document.activeElement.id") == "viewport":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "viewport"
    page.keyboard.press("+")  # the zoom keys need an unfitted view for "0" to show
    for key, changed in KEYS:
        before = state(page)
        page.keyboard.press(key)
        settle(page)
        assert changed(before, state(page)), f"{key}: {before} -> {state(page)}"
    page.keyboard.press("f")
    page.wait_for_function("() => document.fullscreenElement && document.fullscreenElement.id === 'viewer'")
    shot(page, "05-full-screen", full_page=False)
    page.keyboard.press("f")
    page.wait_for_function("() => !document.fullscreenElement")
    page.keyboard.press("?")
    assert page.evaluate("() => document.getElementById('shortcuts').open")
    theme = page.evaluate("() => document.documentElement.dataset.theme")
    page.keyboard.press("t")
    assert page.evaluate("() => document.documentElement.dataset.theme") != theme
    page.reload()  # the choice is kept in this browser
    assert page.evaluate("() => document.documentElement.dataset.theme") != theme
    page.keyboard.press("t")
    # a toolbar button works with Enter as with a click
    page.wait_for_function("() => document.getElementById('viewer').dataset.ready === 'heat'")
    page.focus("#invert-button")
    page.keyboard.press("Enter")
    assert state(page)["invert"] is True and page.get_attribute("#invert-button", "aria-pressed") == "true"
    # typing in a text field types, it does not drive the viewer
    page.goto(f"{room['url']}/studies/{study}/report")
    page.fill("#impression", "")
    page.focus("#impression")
    page.keyboard.type("think")
    assert page.input_value("#impression") == "think"


# -- the theme, REFER and the intended use ------------------------------------------------------------------------

def test_refer_and_outside_the_intended_use_are_shown_with_the_reason(page, room):
    film = full_res_xrays(1, offset=54)[0]
    reason = "The probability, 52.0 %, lies in the refer band 35.0 % to 65.0 %."
    refer = room["study"](film.read_bytes(), film.name, "image/jpeg", probability=0.52, label="PNEUMONIA",
                          decision="REFER", refer_reasons=[{"code": "indeterminate", "text": reason}],
                          in_intended_use=True, ood_score=0.4, model_info=DEMO, cam=cam_grid(7, 7, {(3, 1): 1.0}))
    adult = "The film looks like an adult's; the model was made on children aged 1 to 5."
    outside = room["study"](film.read_bytes(), film.name, "image/jpeg", probability=0.71, label="PNEUMONIA",
                            decision="REFER", in_intended_use=False, ood_score=3.9, model_info=DEMO,
                            refer_reasons=[{"code": "outside_intended_use", "text": adult}],
                            cam=cam_grid(7, 7, {(2, 5): 1.0}), quality_flags=["blurred"])
    open_study(page, room, refer)
    assert page.inner_text("#decision") == "Refer: no finding from the model"
    assert "gives no finding for this film" in page.inner_text("#refer-explanation")
    assert page.inner_text("#refer-reasons") == reason
    assert "50.0 %" in page.inner_text("#threshold-explanation") and "35.0 %" in page.inner_text(
        "#threshold-explanation")
    assert "Demonstration model" in page.inner_text("#demo-banner")
    assert page.inner_text("#model-profile") == "demo (demonstration)"
    figures = page.inner_text("#heldout-figures")
    assert "AUC" in figures and "0.912" in figures and "88.0 %" in figures
    shot(page, "06-refer")
    open_study(page, room, outside)
    assert "unlike the films the model was trained" in page.inner_text("#outside-explanation")
    assert adult in page.inner_text("#refer-reasons")
    flags = page.inner_text("#quality-flags")
    assert "blurred" in flags and "Repeat the film" in flags
    shot(page, "07-outside-intended-use")
    page.goto(room["url"] + "/studies?sort=suspicion")
    row = page.locator(f"tr[data-study-id='{outside}']")
    assert "outside intended use" in row.inner_text() and row.locator("img.thumb").count() == 1
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].every((i) => i.complete && "
                           "i.naturalWidth > 0)")
    shot(page, "08-worklist")


def test_the_dark_theme_and_the_light_theme_pass_4_5_to_1_contrast(page, room):
    from tests.webapp.test_webapp_browser import A11Y_SCRIPT

    film = full_res_xrays(1, offset=55)[0]
    study = room["study"](film.read_bytes(), film.name, "image/jpeg", probability=0.52, label="PNEUMONIA",
                          decision="REFER", refer_reasons=[{"code": "indeterminate", "text": "in the band"}],
                          in_intended_use=False, model_info=DEMO, cam=cam_grid(7, 7, {(3, 1): 1.0}),
                          quality_flags=["object_over_lungs"], identity={"patient_ref": "MRN-1"})
    pages = [f"/studies/{study}", "/studies", f"/studies/{study}/report", "/"]
    for theme in ("dark", "light"):
        for path in pages:
            page.goto(room["url"] + path)
            page.evaluate(f"() => {{ document.documentElement.dataset.theme = '{theme}'; }}")
            if path.startswith("/studies/") and path.count("/") == 2:
                page.wait_for_function("() => document.getElementById('viewer').dataset.ready === 'heat'")
                page.click("#shortcuts summary")
            result = page.evaluate(A11Y_SCRIPT)
            assert result["checked"] > 10, (theme, path)
            assert not result["problems"], f"{theme} {path}: " + "; ".join(result["problems"])
        if theme == "dark":
            page.goto(f"{room['url']}/studies/{study}")
            page.wait_for_function("() => document.getElementById('viewer').dataset.ready === 'heat'")
            background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(13, 17, 23)", background  # the system's dark preference is followed
            shot(page, "09-dark-theme")


# -- the report ------------------------------------------------------------------------------------------------

def test_sign_off_locks_the_report_and_a_correction_makes_a_new_version(page, room):
    film = full_res_xrays(1, offset=56)[0]
    study = room["study"](film.read_bytes(), film.name, "image/jpeg", probability=0.83, label="PNEUMONIA",
                          decision="PNEUMONIA", cam=cam_grid(7, 7, {(4, 2): 1.0}), model_info=DEMO,
                          identity={"patient_ref": "MRN-2290", "view": "AP"})
    page.goto(f"{room['url']}/studies/{study}/report")
    assert page.input_value("#patient_ref") == "MRN-2290"
    page.fill("#accession", "ACC-88")
    page.fill("#clinical_question", "fever, cough")
    page.fill("#impression", "Consolidation in the right lower lobe.")
    page.click("#save-draft")
    page.wait_for_selector("text=The draft was saved.")
    assert page.input_value("#accession") == "ACC-88"
    shot(page, "10-report-draft")
    page.click("#sign-report")
    page.wait_for_selector("#signed-banner")
    assert "Signed by doctor" in page.inner_text("#signed-banner")
    assert page.locator("#impression").count() == 0 and page.locator("#sign-report").count() == 0
    assert page.inner_text("#impression-text") == "Consolidation in the right lower lobe."
    assert "ACC-88" in page.inner_text("#patient-block")
    shot(page, "11-report-signed")
    # the API refuses to change a signed version, with the session as with a token
    answer = page.evaluate("""async (id) => {
        const csrf = document.querySelector('meta[name="csrf-token"]').content;
        const r = await fetch(`/api/studies/${id}/report/draft`, {method: 'PUT', credentials: 'same-origin',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
            body: JSON.stringify({impression: 'edited after signing'})});
        return [r.status, (await r.json()).error]; }""", study)
    assert answer[0] == 409 and "read-only" in answer[1]
    page.fill("#correction-reason", "the left lobe, not the right")
    page.click("#correct-report")
    page.wait_for_selector("#draft-banner")
    assert "correcting version 1" in page.inner_text("#draft-banner")
    assert page.input_value("#impression") == "Consolidation in the right lower lobe."
    assert page.locator("#versions tbody tr").count() == 2
    shot(page, "12-report-correction")
    with page.expect_download() as download:
        page.click("text=Download PDF")
    assert download.value.suggested_filename == f"pneumoscope-study-{study}-v2.pdf"
