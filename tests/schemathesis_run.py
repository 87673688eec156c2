"""schemathesis against the web app's ``/openapi.json``, as the short test and the long benchmark run it (a fixture
module; holds no tests). schemathesis is pinned in the ``dev`` extra.

One run: a real web app process (``python -m webapp``, SQLite or PostgreSQL), an admin's API token in the
``Authorization`` header, every operation of the schema, the coverage, fuzzing and stateful phases, the check
``not_a_server_error`` (nothing answers 5xx), a seed; then the JSON report, the app's log (no traceback) and what
the app stored (every row with its whole file, every file with its row) are read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from webapp_fixtures import api_token, assert_rows_and_files_agree, free_port, start_web

PASSWORD = "a-long-fuzzing-password"


@dataclass
class FuzzRun:
    report: dict
    cases: int
    failures: list
    errors: list
    tracebacks: int
    studies: int
    seconds: float

    @property
    def clean(self) -> bool:
        return not self.failures and not self.errors and not self.tracebacks and self.report["exit_code"] == 0


def fuzz_web_app(root: Path, max_examples: int, seed: int, database_url: str | None = None,
                 inference_url: str | None = None, max_time_s: float | None = None, workers: int = 1) -> FuzzRun:
    """Run schemathesis once against a fresh web app under ``root`` and check what it left behind."""
    root.mkdir(parents=True, exist_ok=True)
    env = {"PNEUMOSCOPE_HOME": str(root), "PNEUMOSCOPE_SECRET_KEY": "fuzzing", "PNEUMOSCOPE_INLINE_WAIT_S": "2",
           "PNEUMOSCOPE_INFERENCE_URL": inference_url or f"http://127.0.0.1:{free_port()}",  # refused: pending
           "PNEUMOSCOPE_IMAGE_STORE": str(root / "images")}
    if database_url:
        env["PNEUMOSCOPE_DATABASE_URL"] = database_url
    token = api_token(env, "fuzzer", PASSWORD)
    _make_admin(env, "fuzzer")
    web = start_web(env, root / "web.log")
    report_path = root / "schemathesis.json"
    argv = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{web.url}/openapi.json",
            "--header", f"Authorization: Bearer {token}", "--checks", "not_a_server_error",
            "--max-examples", str(max_examples), "--seed", str(seed), "--workers", str(workers),
            "--phases", "coverage,fuzzing,stateful", "--generation-database", "none", "--request-timeout", "60",
            "--no-color", "--report", "json", "--report-json-path", str(report_path)]
    if max_time_s:
        argv += ["--max-time", str(int(max_time_s))]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=root, timeout=24 * 3600)
    finally:
        web.stop()
    (root / "schemathesis.out").write_text(result.stdout + result.stderr)
    report = json.loads(report_path.read_text())
    stored = assert_rows_and_files_agree(env.get("PNEUMOSCOPE_DATABASE_URL") or f"sqlite:///{root / 'webapp.db'}",
                                         root / "images")
    return FuzzRun(report, report["test_cases"]["generated"], report["failures"], report["errors"],
                   (root / "web.log").read_text().count("Traceback"), len(stored), report["running_time"])


def _make_admin(env: dict, user: str) -> None:
    from webapp.db import make_engine, session_factory, transaction
    from webapp.models import User
    from webapp.settings import WebSettings

    settings = WebSettings(home=Path(env["PNEUMOSCOPE_HOME"]), database_url=env.get("PNEUMOSCOPE_DATABASE_URL"))
    engine = make_engine(settings.resolved_database_url())
    with transaction(session_factory(engine)) as db:
        db.query(User).filter(User.username == user).update({"is_admin": True})
    engine.dispose()
