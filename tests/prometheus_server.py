"""A real Prometheus (Debian's ``prometheus``) for the tests: a generated config on a free port.

It scrapes the targets of a Prometheus file_sd file (the local canary writes one and keeps it current),
every second, and evaluates the chart's alert rules every second with every ``for`` shortened to
``for_s`` (the rules are otherwise the file the chart ships).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "helm" / "pneumoscope" / "files" / "prometheus-rules.yaml"


class PrometheusServer:
    def __init__(self, targets_file: Path, for_s: int = 2, workdir: Path | None = None):
        from serving.stack import free_port

        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: `make test` installs Debian's prometheus (make deps-monitoring)"
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pneumoscope-prometheus-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = f"{for_s}s"
        (self.dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "800ms", "evaluation_interval": "1s"},
                  "rule_files": [str(self.dir / "rules.yaml")],
                  "scrape_configs": [{"job_name": "pneumoscope", "honor_labels": True,
                                      "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}]}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "ab")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.dir / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready: " + (self.dir / "prometheus.log").read_text()[-2000:])

    def query(self, promql: str) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def alerts(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]

    def targets_up(self) -> dict:
        return {(r["metric"].get("component"), r["metric"].get("model_version")): r["value"][1]
                for r in self.query("up")}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
