"""Shared test fixtures. Real chest X-rays come from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
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
