"""The film viewer in Chromium: first paint of a 2,000 px film (median of 20 page loads) and frame times while
panning and while changing window/level.

    python benchmarks/viewer.py --out runs/viewer.json            # on a quiet machine: nothing else on the cores

A web app process on SQLite (no transformer: the study gets its result, with a 7 x 7 CAM, through the storage
layer) serves a real film from ../shared/data/chest_xray_full resized to 2,000 px on its longer side. Each of
the ``--loads`` page loads opens the study page in a fresh browser context (nothing cached) and times, from the
navigation's start: the film drawn (the viewer's first painted frame) and the heatmap drawn. Then, zoomed 2x,
the page pans by 8 CSS px per animation frame for ``--frames`` frames, and changes window/level once per
frame for as many: ``paint`` is the viewer's own drawing time per frame (two canvases with one transform),
``interval`` the time between frames the browser achieved, ``window_level`` the time to re-map the film's
grey values and draw. The load average is written beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "chest_xray_full" / "train"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PASSWORD = "benchmark-password"

FIRST_PAINT = """() => { window.__viewer = {};
  for (const name of ['viewer-painted', 'viewer-ready']) {
    document.addEventListener(name, () => { if (!(name in window.__viewer)) window.__viewer[name] = performance.now(); },
                              true);
  } }"""

PAN = """async (frames) => {
  const v = window.pneumoscopeViewer;
  v.zoomTo(v.fitScale() * 2);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const paint = [], interval = [];
  let last = null, direction = 1;
  await new Promise((done) => {
    function step(now) {
      if (last !== null) interval.push(now - last);
      last = now;
      if (paint.length >= frames) { done(); return; }
      if (v.state.tx < -v.film.width * v.state.scale + v.viewWidth || v.state.tx > 0) direction = -direction;
      v.state.tx += 8 * direction;
      const t0 = performance.now();
      v.paint();
      paint.push(performance.now() - t0);
      requestAnimationFrame(step);
    }
    requestAnimationFrame(step);
  });
  const times = [];
  for (let i = 0; i < frames; i++) {
    const t0 = performance.now();
    v.state.width = v.film.window.width * (0.5 + (i % 10) / 10);
    v.renderFilm();
    v.paint();
    times.push(performance.now() - t0);
  }
  return {paint, interval, window_level: times};
}"""


def film_2000(out: Path) -> Path:
    from PIL import Image

    source = max(sorted(DATA.glob("*/*.jpeg"))[:40], key=lambda f: Image.open(f).width)
    with Image.open(source) as image:
        gray = image.convert("L")
    scale = 2000 / max(gray.size)
    gray = gray.resize((round(gray.width * scale), round(gray.height * scale)), Image.Resampling.LANCZOS)
    path = out / "film-2000.jpeg"
    gray.save(path, quality=92)
    return path


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2), "n": len(ordered)}


def start_app(home: Path) -> tuple[subprocess.Popen, str, int]:
    """The web app (its own process) with one study carrying a result; returns (process, url, study id)."""
    import httpx

    sys.path.insert(0, str(REPO))
    from webapp import accounts
    from webapp.db import make_engine, session_factory, transaction, upgrade
    from webapp.settings import WebSettings

    env = {**os.environ, "PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_INFERENCE_URL": "http://127.0.0.1:9",
           "PNEUMOSCOPE_INLINE_WAIT_S": "1", "PNEUMOSCOPE_RETRY_INITIAL_S": "3600", "PNEUMOSCOPE_RETRY_MAX_S": "3600",
           "PNEUMOSCOPE_SECRET_KEY": "viewer-benchmark", "PYTHONPATH": str(REPO)}
    settings = WebSettings(home=home)
    engine = make_engine(settings.resolved_database_url())
    upgrade(engine)
    with transaction(session_factory(engine)) as db:
        accounts.add_user(db, "reader", PASSWORD)
        token = accounts.issue_token(db, "reader", "benchmark")[0]
    engine.dispose()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(home / "web.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "webapp", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    film = film_2000(home)
    answer = httpx.post(url + "/api/studies", headers={"authorization": f"Bearer {token}"}, timeout=60,
                        files={"file": (film.name, film.read_bytes(), "image/jpeg")})
    study = answer.json()["id"]
    give_result(settings, study)
    return process, url, study


def give_result(settings, study_id: int) -> None:
    import numpy as np

    from webapp.db import make_engine, session_factory
    from webapp.inference import InferenceResult
    from webapp.storage import ImageStore
    from webapp.studies import StudyService

    cam = np.zeros((7, 7))
    cam[3, 2], cam[4, 2], cam[3, 5] = 1.0, 0.7, 0.6
    engine = make_engine(settings.resolved_database_url())
    StudyService(settings, session_factory(engine), ImageStore(settings.resolved_image_store()), None).record_result(
        study_id, InferenceResult(probability=0.8, label="PNEUMONIA", threshold=0.5, model_name="pneumonia",
                                  model_version="1", heatmap_png=None,
                                  cam={"rows": 7, "cols": 7, "values": [float(v) for v in cam.ravel()]}))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=20, help="page loads for the first paint (median)")
    parser.add_argument("--frames", type=int, default=240, help="frames of panning, and of window/level")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the shared development data is missing (see ../shared/data/README.md)")
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} not found: apt-get install chromium")
    from playwright.sync_api import sync_playwright
    from serving_throughput import write_report  # this folder is on the path when run as a script

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pneumoscope-viewer-") as folder:
        process, url, study = start_app(Path(folder))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
                login = browser.new_context()
                page = login.new_page()
                page.goto(url + "/login")
                page.fill("#username", "reader")
                page.fill("#password", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(url + "/")
                cookies = login.cookies()
                login.close()
                film_ms, heat_ms = [], []
                for i in range(args.loads):
                    context = browser.new_context(viewport={"width": 1440, "height": 900})
                    context.add_cookies(cookies)
                    context.add_init_script(f"({FIRST_PAINT})();")
                    page = context.new_page()
                    page.goto(f"{url}/studies/{study}")
                    page.wait_for_function("() => window.__viewer && 'viewer-ready' in window.__viewer",
                                           timeout=60_000)
                    marks = page.evaluate("() => window.__viewer")
                    film_ms.append(marks["viewer-painted"])
                    heat_ms.append(marks["viewer-ready"])
                    if i == args.loads - 1:
                        size = page.evaluate("() => [pneumoscopeViewer.film.width, pneumoscopeViewer.film.height]")
                        frames = page.evaluate(PAN, args.frames)
                    context.close()
                    print(f"load {i + 1}/{args.loads}: film {film_ms[-1]:.0f} ms, heatmap {heat_ms[-1]:.0f} ms",
                          file=sys.stderr, flush=True)
                browser.close()
        finally:
            process.terminate()
            process.wait(20)
    report = {"film_px": size, "loads": args.loads, "first_paint_film": summary(film_ms),
              "first_paint_heatmap": summary(heat_ms), "pan_paint": summary(frames["paint"]),
              "pan_interval": summary(frames["interval"]), "window_level": summary(frames["window_level"]),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "chromium": CHROMIUM, "flags": CHROMIUM_FLAGS}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
