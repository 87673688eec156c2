"""Prometheus metrics of the gateway, and the small HTTP server that shows them (``/metrics``) beside its health
(``/healthz``: the process answers; ``/readyz``: the database answers at the schema it needs and the Storage SCP
listens). One process, one registry; no PHI in any label.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

RECEIVED = Counter("pneumoscope_gateway_received_total",
                   "Objects received (C-STORE or DICOMweb) by outcome: accepted, duplicate, ignored_<reason> or "
                   "refused_<reason>", ["outcome"])
ASSOCIATIONS = Counter("pneumoscope_gateway_associations_total",
                       "DICOM association requests by outcome (accepted, rejected: a calling AE title not allowed)",
                       ["outcome"])
SCORED = Counter("pneumoscope_gateway_scored_total",
                 "Scoring attempts by outcome (scored, rejected by the transformer, retry)", ["outcome"])
SENT = Counter("pneumoscope_gateway_sent_total", "Result objects sent to the PACS by kind (sr, sc, pdf) and outcome "
               "(stored, retry, refused)", ["kind", "outcome"])
WAITING = Gauge("pneumoscope_gateway_waiting", "Work waiting: instances to score, results to send, results the "
                "PACS refused (kept for an admin)", ["queue"])
RECEIPT_TO_STORED = Histogram("pneumoscope_gateway_receipt_to_stored_seconds",
                              "From receipt of a film to its last result stored in the PACS",
                              buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400))
POLLS = Counter("pneumoscope_gateway_polls_total", "DICOMweb polls of the PACS by outcome (ok, error)", ["outcome"])


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (True, "ok"))

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/metrics":
            self._answer(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            self._answer(200, b'{"status": "ok"}', "application/json")
        elif self.path == "/readyz":
            ok, why = self.ready()
            self._answer(200 if ok else 503, json.dumps({"ready": ok, "detail": why}).encode(), "application/json")
        else:
            self._answer(404, b'{"error": "not found"}', "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # scrapes every 15 s would flood the log
        pass


def serve_metrics(host: str, port: int, ready: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer:
    """Start the metrics and health server in a daemon thread; ``server.server_address[1]`` is its port."""
    handler = type("GatewayHTTPHandler", (_Handler,), {"ready": staticmethod(ready)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="gateway-metrics", daemon=True).start()
    return server
