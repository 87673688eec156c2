"""Small, synthetic but complete inputs for the tests that prove the method's claims (no shared data needed).

- :func:`synthetic_kaggle`: a Kaggle-layout folder of PNGs named like the real files (several images per
  patient, a brightness per patient, a faint class signal), so ``data prepare`` groups and gates them
  exactly as it does real X-rays.
- the ``tiny_model`` session fixture: that folder prepared at 32 px, a ResNet-50 trained for two steps and
  evaluated with ``evaluate_checkpoint`` (ONNX bundle, report with CIs, plots). Cheap (~30 s on 2 cores),
  built once and shared by the evaluation, export and registry claims.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TINY_SIZE = 32


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def xray_like(level: float, label: int, rng: np.random.Generator, size: int = 72) -> np.ndarray:
    """A noisy frame around ``level`` (0-255); pneumonia frames carry a brighter blob (a weak, learnable signal)."""
    pixels = rng.normal(level, 25.0, (size, size))
    if label:
        yy, xx = np.mgrid[:size, :size]
        pixels += 40.0 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (2 * (size / 6) ** 2))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def synthetic_kaggle(root: Path, patients: dict[str, int] | None = None, images_per_patient=(1, 2, 3),
                     seed: int = 0, official: dict[str, int] | None = None) -> Path:
    """Kaggle layout under ``root``: ``train/{NORMAL,PNEUMONIA}`` with ``patients[cls]`` patients each holding
    1-3 images (real naming: ``IM-0007-0002.png``, ``person7_bacteria_2.png``), plus ``official`` single-image
    patients in ``test/`` and ``val/`` (e.g. ``{"test": 12, "val": 4}`` per class)."""
    patients = patients or {"NORMAL": 30, "PNEUMONIA": 60}
    official = official or {}
    rng = np.random.default_rng(seed)
    counter = 0
    for split, per_class in [("train", None), *official.items()]:
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            n_patients = patients[cls] if split == "train" else per_class
            for _ in range(n_patients):
                counter += 1
                level = rng.uniform(70, 170)  # each patient has their own exposure
                count = images_per_patient[counter % len(images_per_patient)] if split == "train" else 1
                for i in range(count):
                    name = f"IM-{counter:04d}-{i + 1:04d}.png" if label == 0 else f"person{counter}_bacteria_{i + 1}.png"
                    (folder / name).write_bytes(png(xray_like(level, label, rng)))
    return root


@dataclass
class TinyModel:
    data: Path
    cache: Path
    train_dir: Path
    eval_dir: Path
    report: dict

    @property
    def bundle(self) -> Path:
        return self.eval_dir / "bundle"

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoint.pt"


def tiny_profile(**overrides):
    from model.profiles import get_profile

    settings = dict(image_size=TINY_SIZE, epochs=1, batch_size=8, max_steps_per_epoch=2, num_workers=0)
    settings.update(overrides)
    return get_profile("smoke", **settings)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    from model.data import SplitFractions, prepare
    from model.evaluation import EvalSettings, evaluate_checkpoint
    from model.training import train

    # PNEUMOSCOPE_TEST_TINY_MODEL: a folder kept between pytest sessions (the mutation benchmark runs the
    # registry tests once per mutant); the model is built there once and reused.
    kept = os.environ.get("PNEUMOSCOPE_TEST_TINY_MODEL")
    root = Path(kept) if kept else tmp_path_factory.mktemp("tiny_model")
    if kept and (root / "eval" / "report.json").is_file():
        report = json.loads((root / "eval" / "report.json").read_text())
        return TinyModel(root / "data", root / "cache", root / "train", root / "eval", report)
    # val and holdout >= 20 images each (they get CIs), the official val ("sanity") 8 (it does not)
    data = synthetic_kaggle(root / "data", {"NORMAL": 36, "PNEUMONIA": 36}, official={"test": 12, "val": 4})
    prepare(str(data), root / "cache", TINY_SIZE, SplitFractions(val=0.2, holdout=0.2, seed=0), workers=1)
    train(root / "cache", root / "train", tiny_profile(), seed=0, device="cpu")
    (root / "train" / "last.pt").unlink()  # the resume state (4x the checkpoint): no test resumes this run
    report = evaluate_checkpoint(root / "train" / "checkpoint.pt", root / "cache", root / "eval",
                                 EvalSettings(n_bootstrap=200, int8=False))
    return TinyModel(data, root / "cache", root / "train", root / "eval", report)
