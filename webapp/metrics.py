"""Prometheus metrics of the web app (served at ``/metrics``; one process, one registry)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("pneumoscope_web_requests_total", "HTTP requests by route template, method and status",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram("pneumoscope_web_request_seconds", "HTTP request latency by route template",
                            ["route", "method"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
UPLOADS = Counter("pneumoscope_web_uploads_total", "Uploads by outcome (scored, pending, rejected_by_model, "
                  "or the reason the app refused the file)", ["outcome"])
PENDING = Gauge("pneumoscope_web_pending_studies", "Studies stored but not scored yet")
INFERENCE_SECONDS = Histogram("pneumoscope_web_inference_seconds", "Round trip to the transformer by outcome",
                              ["outcome"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
DUPLICATE_RESULTS = Counter("pneumoscope_web_duplicate_results_total", "Results that reached a study which "
                            "already had one (dropped: a study is scored once)")
RETRIES = Counter("pneumoscope_web_retries_total", "Retry-worker attempts by outcome", ["outcome"])


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request under its route template, never its URL
    (``/api/studies/{study_id}``, so ids do not explode the label set)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("static" if scope["path"].startswith("/static/")
                                                        else "unmatched")
            method = scope.get("method", "GET")
            REQUESTS.labels(template, method, str(status["code"])).inc()
            REQUEST_SECONDS.labels(template, method).observe(time.perf_counter() - started)
