"""schemathesis against the web app's OpenAPI document, seeded and short (the >= 10,000-case run is
benchmarks/webapp_schemathesis.py): every operation, signed in with an admin's token; nothing answers 5xx, the
app logs no traceback, and every stored study has its whole file and every file its study."""

from __future__ import annotations

import pytest

from schemathesis_run import fuzz_web_app

pytestmark = pytest.mark.integration

SEED = 20261206


def test_schemathesis_finds_no_server_error_and_no_inconsistent_row(tmp_path):
    run = fuzz_web_app(tmp_path / "fuzz", max_examples=25, seed=SEED)
    assert run.clean, (run.failures[:3], run.errors[:3], run.tracebacks, (tmp_path / "fuzz" / "schemathesis.out")
                       .read_text()[-3000:])
    assert run.report["operations"]["tested"] >= 10, run.report["operations"]  # every API operation, audit included
    assert run.cases >= 300, run.cases
    assert run.studies >= 1, "the fuzzer's uploads reached the store (and were checked against their rows)"
