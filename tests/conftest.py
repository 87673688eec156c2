"""Shared test fixtures. Real chest X-rays come from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Every predictor the tests start chooses its engine at load (auto: gate + timing of each candidate); the
# tests need a choice, not a precise one, so each candidate is timed briefly (the default is 1 s).
os.environ.setdefault("PNEUMOSCOPE_ENGINE_TIMING_S", "0.2")

REPO = Path(__file__).resolve().parents[1]
# PNEUMOSCOPE_SHARED_DATA points elsewhere (e.g. a git worktree whose parent has no shared/ folder).
SHARED_DATA = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA") or REPO.parent / "shared" / "data")
MISSING_DATA = (f"real X-rays not found at {SHARED_DATA} (the shared data folder is missing on this machine); "
                "this test needs them")


def require_shared(sub: str = "") -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(MISSING_DATA)
    return path


@pytest.fixture(scope="session")
def shared_224() -> Path:
    return require_shared("chest_xray_224")


@pytest.fixture(scope="session")
def shared_full() -> Path:
    return require_shared("chest_xray_full")


def make_kaggle_subset(dest: Path, per_class: int = 20, source: Path | None = None, splits=("train",),
                       offset: int = 0) -> Path:
    """A small Kaggle-layout folder of real images (copied into tmp, never into the repo)."""
    source = source or require_shared("chest_xray_224")
    for split in splits:
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((source / "train" / cls).iterdir())[offset:offset + per_class]
            target = dest / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, target / f.name)
    return dest


# The web app's session-wide services (PostgreSQL, moto, the serving stack) and the gateway's (Orthanc, the
# transformer) live in plugin modules.
pytest_plugins = ["webapp_fixtures", "gateway_fixtures"]
# Session fixtures of the method-claims tests (a tiny trained + evaluated model), shared across modules.
from claims_fixtures import tiny_model  # noqa: E402,F401


@pytest.fixture(scope="session")
def pipeline_first_run(tmp_path_factory) -> dict:
    """The training pipeline run once on kfp.local (smoke profile, 40 real X-rays per class) into a fresh
    SQLite MLflow store: what ``make demo`` produces, at test scale. Shared by the pipeline test (which
    then runs it a second time) and the end-to-end serving test (which serves the version it registered)."""
    import json
    import subprocess
    import sys

    data = require_shared("chest_xray_224")
    root = tmp_path_factory.mktemp("pipeline")
    home, uri = root / "home", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PNEUMOSCOPE_HOME=str(home), NO_ALBUMENTATIONS_UPDATE="1")
    result = subprocess.run([str(Path(sys.executable).parent / "pneumoscope"), "pipeline", "run", "--local",
                             "--data", str(data), *PIPELINE_SMOKE, "--mlflow-uri", uri],
                            capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "stdout holds only the result; the steps' logs go to stderr"
    return {"result": json.loads(lines[0]), "home": home, "tracking_uri": uri, "data": data}


# int8 quantisation (~10 s a run here) is left to model's tests; the pipeline exposes it as a parameter.
PIPELINE_SMOKE = ["--profile", "smoke", "--limit-per-class", "40", "--n-bootstrap", "200", "--no-int8"]


# Free disk where the tests write (tmp_path, servers' folders, the Docker engine here), in the run's last lines: a
# run that fills the disk fails everywhere at once, and this says so.
_DISK: dict = {}


def _free_gib() -> float:
    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


def pytest_sessionstart(session):
    free = _free_gib()
    _DISK.update(start=free, lowest=free, at="the start")


def pytest_runtest_logreport(report):
    if report.when == "call":  # the test's folders are still there
        free = _free_gib()
        if free < _DISK["lowest"]:
            _DISK.update(lowest=free, at=report.nodeid)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"disk: {_DISK['start']:.1f} GiB free under {tempfile.gettempdir()} at the "
                                f"start, {_DISK['lowest']:.1f} GiB at the lowest (after {_DISK['at']}), "
                                f"{_free_gib():.1f} GiB at the end")
