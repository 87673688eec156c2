"""The web app's latency: upload-to-result in a real browser vs the transformer's own latency, same run.

    python benchmarks/webapp_latency.py [--uploads 50] [--model BUNDLE|models:/...] [--out runs/webapp_latency.json]

1. The serving stack (``LocalStack``: predictor + transformer processes) with the web app beside it, on
   the 224 px benchmark bundle of ``serving_throughput.py`` (untrained ResNet-50: speed does not depend
   on the weights) unless ``--model`` names a real one. SQLite and images in a temporary home.
2. For each of N full-resolution X-rays from ``../shared/data/chest_xray_full`` (interleaved, so drift
   hits all three alike):
   - transformer: the app's own client (``webapp.inference.InferenceClient``, the same v2 request with the
     heatmap, a kept-alive connection) straight to the transformer, without the app;
   - API: ``POST /api/studies`` with a bearer token (store, score, answer), and the app's own record of
     its round trip to the transformer (``result.inference_ms``);
   - browser: Chromium (Playwright) on the upload page: click "Upload and analyse" -> the result and the
     heatmap drawn on the study page (upload, scoring, redirect, page, image and heatmap downloads);
     split into "until the study page's URL" and "page shown with both images".
3. Medians and p95; "app adds" = median(path) - median(transformer).

Three warm-up uploads are not counted. Results: one JSON document (``--out``, and stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
FULL = ROOT.parent / "shared" / "data" / "chest_xray_full" / "train"
PASSWORD = "benchmark-password"

from serving_throughput import build_bundle, cpu_info, load_images, log, write_report  # noqa: E402


def full_res(count: int) -> list[Path]:
    if not FULL.is_dir():
        sys.exit(f"full-resolution X-rays not found at {FULL}: the benchmark needs ../shared/data/chest_xray_full")
    by_class = [sorted((FULL / cls).iterdir()) for cls in ("NORMAL", "PNEUMONIA")]
    return [by_class[i % 2][i // 2] for i in range(count)]


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": len(a), "median_ms": round(float(np.median(a)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "mean_ms": round(float(a.mean()), 1)}


class Deployment:
    """The stack + web app in a temporary home with one user and an API token (a context manager)."""

    def __init__(self, model: str | None, web: bool = True, env: dict | None = None):
        self.model, self.web, self.env = model, web, env or {}

    def __enter__(self):
        from serving.settings import ServingSettings
        from serving.stack import LocalStack, port_free
        from webapp_fixtures import api_token, free_port

        self.tmp = tempfile.TemporaryDirectory(prefix="pneumoscope-bench-")
        home = Path(self.tmp.name)
        model = self.model or str(build_bundle(ROOT / ".pneumoscope" / "bench" / "bundle224", load_images(32)[0]))
        port = free_port()
        while not all(port_free(p) for p in (port, port + 1, port + 2)):
            port = free_port()
        self.env = {"PNEUMOSCOPE_HOME": str(home), "PNEUMOSCOPE_SECRET_KEY": "bench", **self.env}
        self.token = api_token(self.env, "bench", PASSWORD)
        settings = ServingSettings()
        if not model.startswith("models:/") and not settings.model_sha256:
            from model.bundle import Bundle

            settings = settings.model_copy(update={"model_sha256": Bundle.load(model, verify=False).sha256})
        self.stack = LocalStack(model, port, settings, log_file=home / "stack.log",
                                web_port=port + 2 if self.web else None, extra_env=self.env)
        log(f"starting the stack on {port} (web app on {port + 2})" if self.web else f"starting the stack on {port}")
        self.info = self.stack.start(timeout=300)
        return self

    def __exit__(self, *exc):
        self.stack.stop()
        self.tmp.cleanup()


def run(uploads: int, model: str | None) -> dict:
    import httpx
    from playwright.sync_api import sync_playwright

    from webapp.inference import InferenceClient
    from webapp_fixtures import CHROMIUM, CHROMIUM_FLAGS

    files = full_res(uploads + 3)
    times = {"transformer": [], "api": [], "api_inference": [], "browser": [], "browser_to_study_url": [],
             "browser_study_page_shown": []}
    loop = asyncio.new_event_loop()  # in a thread of its own: Playwright's sync API holds this thread's loop
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    with Deployment(model) as deployment, sync_playwright() as playwright:
        web, rest = deployment.info["web"], deployment.info["rest"]
        direct = InferenceClient(rest, timeout_s=120)
        api = httpx.Client(base_url=web, headers={"authorization": f"Bearer {deployment.token}"}, timeout=120)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(web + "/login")
        page.fill("#username", "bench")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(web + "/")
        for i, path in enumerate(files):
            data = path.read_bytes()
            started = time.perf_counter()
            call(direct.infer(data))
            transformer_ms = (time.perf_counter() - started) * 1000

            started = time.perf_counter()
            reply = api.post("/api/studies", files={"file": (path.name, data, "image/jpeg")})
            api_ms = (time.perf_counter() - started) * 1000
            if reply.status_code != 201:
                raise SystemExit(f"upload of {path.name} answered {reply.status_code}: {reply.text[:300]}")

            page.goto(web + "/")
            page.set_input_files("#file", str(path))
            started = time.perf_counter()
            page.click("#upload-button")
            page.wait_for_url(re.compile(r".*/studies/\d+$"), timeout=120_000)
            navigated_ms = (time.perf_counter() - started) * 1000
            page.wait_for_selector("#state-done", state="visible", timeout=120_000)
            page.wait_for_function("() => ['xray', 'heatmap'].every((id) => { const i = document.getElementById(id);"
                                   " return i.complete && i.naturalWidth > 0; })", timeout=120_000)
            browser_ms = (time.perf_counter() - started) * 1000
            if i < 3:
                continue  # warm-up
            times["transformer"].append(transformer_ms)
            times["api"].append(api_ms)
            times["api_inference"].append(reply.json()["result"]["inference_ms"])
            times["browser"].append(browser_ms)
            times["browser_to_study_url"].append(navigated_ms)
            times["browser_study_page_shown"].append(browser_ms - navigated_ms)
            if (i - 2) % 10 == 0:
                log(f"{i - 2}/{uploads}: transformer {transformer_ms:.0f} ms, API {api_ms:.0f} ms, "
                    f"browser {browser_ms:.0f} ms")
        browser.close()
        call(direct.aclose())
    loop.call_soon_threadsafe(loop.stop)
    result = {name: summary(values) for name, values in times.items()}
    base = result["transformer"]["median_ms"]
    result["app_adds_median_ms"] = {"api": round(result["api"]["median_ms"] - base, 1),
                                    "browser_until_study_url": round(
                                        result["browser_to_study_url"]["median_ms"] - base, 1),
                                    "browser": round(result["browser"]["median_ms"] - base, 1),
                                    "api_over_its_own_inference_call": round(float(np.median(
                                        np.asarray(times["api"]) - np.asarray(times["api_inference"]))), 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--model", help="a bundle folder or models:/ URI (default: the untrained 224 px bundle)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = {"benchmark": "webapp_latency", "started": started, "machine": cpu_info(),
              "uploads": args.uploads, **run(args.uploads, args.model)}
    write_report(result, args.out, indent=1)


if __name__ == "__main__":
    main()
