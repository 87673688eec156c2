"""Lung fields: the segmentation model's input and output, the lung box, and where the CAM mass falls.

Everything here is numpy + Pillow (+ ONNX Runtime for :class:`LungSegmenter`, imported when used), so the
predictor runs it without torch, and training, evaluation and serving call the SAME functions:

- :func:`segmentation_input`: stage-1 pixels -> the U-Net's float32 input (a squash-resize to
  :data:`SEGMENTATION_SIZE` with the preprocessing's own ``resize``, then the segmentation model's mean/std);
- :class:`LungSegmenter`: the exported U-Net (``lung.onnx`` in a model bundle) -> a boolean lung mask in the
  squashed frame of the image it was given (row y of the mask = row y * H / size of the image);
- :func:`lung_box`: the lung bounding box with a margin, in fractions of the image, or None when the mask is
  too small to trust (then nothing is cropped);
- :func:`lung_share`: the share of the positive CAM mass, upsampled to the mask, that falls inside it.

The segmentation model is trained by ``model.lung_segmentation`` (torch, MONAI's U-Net) and travels as a
folder with ``lung.onnx`` + ``lung.json`` (:data:`LUNG_ONNX`, :data:`LUNG_META`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model.preprocessing import (MIN_LUNG_AREA, PreprocessConfig, box_pixels, crop, lung_box,  # noqa: F401
                                 resize, resize_mask)

#: The U-Net's input side: lung fields are large, smooth shapes; 128 px keeps them to within 1 % of the side.
SEGMENTATION_SIZE = 128
LUNG_ONNX = "lung.onnx"
LUNG_META = "lung.json"
LUNG_INPUT, LUNG_OUTPUT = "image", "lung_logit"


@dataclass(frozen=True)
class LungModelInfo:
    """What ``lung.json`` records beside the graph: its input normalisation and how it was measured."""

    size: int = SEGMENTATION_SIZE
    mean: float = 0.5
    std: float = 0.25
    dice: dict = field(default_factory=dict)  # {"test": mean, "test_ci95": [lo, hi], "val": ..., "n_test": ...}
    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LungModelInfo":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def segmentation_input(pixels: np.ndarray, info: LungModelInfo) -> np.ndarray:
    """uint8 (H, W) -> float32 (1, 1, size, size): squash-resize (bilinear, as stage 2 does) and normalise."""
    small = resize(np.asarray(pixels, dtype=np.uint8), PreprocessConfig(image_size=info.size))
    scale = np.float32(1.0 / (255.0 * info.std))
    offset = np.float32(info.mean / info.std)
    return (small.astype(np.float32) * scale - offset)[None, None]


class LungSegmenter:
    """The exported lung U-Net on ONNX Runtime. One image per run: the mask of an image never depends on the
    batch it came in, so the training cache and the predictor get the same bits from the same pixels."""

    def __init__(self, onnx_path: str | Path, info: LungModelInfo, threads: int | None = None):
        from model.bundle import make_session

        self.onnx_path, self.info = Path(onnx_path), info
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"lung segmentation graph not found: {self.onnx_path}")
        self.session = make_session(self.onnx_path, threads)

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None) -> "LungSegmenter | None":
        """A model bundle's lung segmentation model (``lung.onnx`` + the bundle's ``lung_segmentation``), or None."""
        meta = bundle.meta.get("lung_segmentation")
        if not meta:
            return None
        if LUNG_ONNX not in bundle.meta["files"]:
            from model.bundle import BundleError

            raise BundleError(f"the bundle describes a lung segmentation model but lists no {LUNG_ONNX}")
        return cls(bundle.root / LUNG_ONNX, LungModelInfo.from_dict(meta), threads)

    @classmethod
    def from_folder(cls, folder: str | Path, threads: int | None = None) -> "LungSegmenter":
        """A folder written by ``pneumoscope lungs train`` (``lung.onnx`` + ``lung.json``)."""
        folder = Path(folder)
        if not (folder / LUNG_ONNX).is_file() or not (folder / LUNG_META).is_file():
            raise FileNotFoundError(f"no {LUNG_ONNX} + {LUNG_META} in {folder}: not a lung segmentation model "
                                    "(pneumoscope lungs train writes one)")
        return cls(folder / LUNG_ONNX, LungModelInfo.from_dict(json.loads((folder / LUNG_META).read_text())), threads)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (size, size) lung logits of one stage-1 image."""
        return self.session.run([LUNG_OUTPUT], {LUNG_INPUT: segmentation_input(pixels, self.info)})[0][0, 0]

    def mask(self, pixels: np.ndarray) -> np.ndarray:
        """bool (size, size): True on the lung fields."""
        return self.logits(pixels) > 0.0


def upsample_cam(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Positive part of a low-resolution CAM, bilinearly upsampled (pixel-centre aligned, edges clamped: Pillow's
    BILINEAR, the same resampling as the served heatmap) to (height, width)."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    image = Image.fromarray(np.ascontiguousarray(positive))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


@functools.lru_cache(maxsize=256)
def bilinear_weights(n: int, m: int) -> np.ndarray:
    """(m, n) float64, read-only: :func:`upsample_cam`'s resampling of one axis from n to m samples as a matrix.
    Read from Pillow itself (the identity resized along that axis) so that it is exactly the heatmap's resampling."""
    identity = Image.fromarray(np.eye(n, dtype=np.float32))
    weights = np.asarray(identity.resize((m, n), Image.Resampling.BILINEAR), dtype=np.float64).T.copy()
    weights.flags.writeable = False
    return weights


def lung_share(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive CAM mass inside the lung mask: sum(up(relu(cam)) * mask) / sum(up(relu(cam))), with
    the CAM upsampled to the mask's size (:func:`upsample_cam`). NaN when the CAM has no positive mass.

    The upsampling is linear (up(p) = Rh p Rw^T), so both sums are taken on the CAM's own grid against the mask
    projected onto it (Rh^T mask Rw): the same number without building the upsampled image, which cost the
    predictor a tenth of its own time per request."""
    mask = np.asarray(mask, dtype=bool)
    positive = np.maximum(np.asarray(cam, dtype=np.float64), 0.0)
    rows, cols = bilinear_weights(positive.shape[0], mask.shape[0]), bilinear_weights(positive.shape[1], mask.shape[1])
    total = float(rows.sum(axis=0) @ positive @ cols.sum(axis=0))
    if total <= 0.0:
        return float("nan")
    inside = float(np.sum(positive * (rows.T @ mask.astype(np.float64) @ cols)))
    return min(1.0, max(0.0, inside / total))


def lung_shares(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """:func:`lung_share` of every (cam, mask) pair; a single mask (H, W) serves every CAM."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = np.broadcast_to(masks, (len(cams), *masks.shape))
    return np.array([lung_share(c, m) for c, m in zip(cams, masks)], dtype=np.float64)
