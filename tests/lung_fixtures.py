"""Synthetic lung fields for the lung segmentation tests (no shared data needed).

- :func:`synthetic_lung_pairs`: a folder laid out like ``lung_masks_256`` (``images/``, ``masks/``,
  ``sources.csv`` with patients): bright frames with two darker elliptical "lungs", the masks those ellipses.
- :func:`darkness_segmenter`: a lung "segmentation model" exported with the U-Net's input and output names that
  calls the darker, smoothed regions of a film lungs: a stand-in with a known, deterministic behaviour for the
  tests of the crop and serving plumbing (the real U-Net's quality is measured by its own test).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image


def lung_ellipses(size: int, rng: np.random.Generator) -> np.ndarray:
    """bool (size, size): two vertical ellipses, jittered, where the lungs of a frontal film are."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for side in (0.3, 0.7):
        cy, cx = size * rng.uniform(0.45, 0.55), size * (side + rng.uniform(-0.04, 0.04))
        ry, rx = size * rng.uniform(0.26, 0.34), size * rng.uniform(0.12, 0.16)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def synthetic_film(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(150, 200)
    pixels = rng.normal(level, 12.0, mask.shape) - mask * rng.uniform(60, 90)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def synthetic_lung_pairs(root: Path, n: int = 48, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        mask = lung_ellipses(size, rng)
        name = f"film{i:03d}.png"
        Image.fromarray(synthetic_film(mask, rng)).save(root / "images" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name)
        rows.append({"file": name, "patient": str(i // 2), "view": "PA"})  # two films per patient
    with (root / "sources.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "patient", "view"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def darkness_segmenter(folder: Path, size: int = 32, mean: float = 0.5, std: float = 0.25,
                       cut: float = 0.0) -> Path:
    """``lung.onnx`` + ``lung.json``: logit = cut - (the 5x5 local mean of the normalised input), inside the central
    three fifths of the film: regions there darker than ``mean + cut * std`` (after smoothing) are "lungs"."""
    import torch
    from torch import nn

    from model.lung_fields import LungModelInfo
    from model.lung_segmentation import export_lung_onnx

    class Darkness(nn.Module):
        def __init__(self):
            super().__init__()
            self.smooth = nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
            window = torch.full((1, 1, size, size), -10.0)  # the film's outer fifth is never lung: air, labels
            window[..., size // 5: size - size // 5, size // 5: size - size // 5] = 10.0
            self.register_buffer("window", window)

        def forward(self, x):
            return torch.minimum(cut - self.smooth(x), self.window)

    folder.mkdir(parents=True, exist_ok=True)
    export_lung_onnx(Darkness(), size, folder / "lung.onnx")
    (folder / "lung.json").write_text(json.dumps(LungModelInfo(size=size, mean=mean, std=std).to_dict()))
    return folder
