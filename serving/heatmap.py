"""The heatmap: the class-activation map the model already returns, rendered over the X-ray.

For a global-average-pool + linear head, Grad-CAM on layer4 equals ReLU(sum_k w_k A_k) up to a
positive factor, which is exactly the ``cam`` output of the exported graph. Rendering is therefore
post-processing only: ReLU, scale to [0, 1], bilinear upsampling to the image, a colour map, a PNG.
Pillow + numpy; no matplotlib at serve time.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Turbo colour map (Google, Apache-2.0), polynomial approximation of the published table.
_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def _turbo_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    powers = np.stack([x ** i for i in range(6)])
    rgb = np.stack([np.dot(coeffs, powers) for coeffs in (_R, _G, _B)], axis=1)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


TURBO = _turbo_lut()  # (256, 3) uint8


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """ReLU, then scale to [0, 1] by the maximum (all zeros when nothing is positive)."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    peak = float(positive.max()) if positive.size else 0.0
    return positive / peak if peak > 0 else np.zeros_like(positive)


def upsample(heat: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float map (pixel-centre aligned, like ``align_corners=False``)."""
    image = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def heatmap(cam: np.ndarray, width: int, height: int, box=None) -> np.ndarray:
    """Low-resolution CAM -> [0, 1] heatmap of the image's size. ``box`` (top, left, bottom, right fractions:
    the predictor's ``input_box``) is the part of the image the model saw, and so the CAM covers; 0 elsewhere."""
    if box is None or tuple(float(b) for b in box) == (0.0, 0.0, 1.0, 1.0):
        return np.clip(upsample(normalise_cam(cam), width, height), 0.0, 1.0)
    top, left = int(np.floor(box[0] * height)), int(np.floor(box[1] * width))
    bottom, right = max(top + 1, int(np.ceil(box[2] * height))), max(left + 1, int(np.ceil(box[3] * width)))
    out = np.zeros((height, width), dtype=np.float32)
    out[top:bottom, left:right] = np.clip(upsample(normalise_cam(cam), right - left, bottom - top), 0.0, 1.0)
    return out


def fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_overlay(gray: np.ndarray, cam: np.ndarray, max_side: int = 512, alpha: float = 0.55, box=None) -> bytes:
    """PNG of the grayscale X-ray with the heatmap blended in (hot regions opaque, cold ones clear)."""
    height, width = gray.shape
    out_w, out_h = fit(width, height, max_side)
    base = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8))
    if (out_w, out_h) != (width, height):
        base = base.resize((out_w, out_h), Image.Resampling.BILINEAR)
    base_rgb = np.repeat(np.asarray(base, dtype=np.float32)[..., None], 3, axis=2)
    heat = heatmap(cam, out_w, out_h, box)
    colour = TURBO[np.round(heat * 255.0).astype(np.uint8)].astype(np.float32)
    weight = (alpha * heat)[..., None]
    blended = np.round(base_rgb * (1.0 - weight) + colour * weight).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
