"""Image-quality checks that neither training nor serving decisions depend on: blur and burned-in text.

No torch, no OpenCV: numpy and Pillow only, so the KServe transformer runs exactly these functions on the
gray pixels it decoded, and ``data prepare`` runs them on every training image.

- **Sharpness**: the variance of the Laplacian at a fixed analysis resolution (224 px, the resolution of the
  development data and of the ``gpu`` profile), so that a full-resolution upload and a 224 px training copy
  are measured alike. A film is *blurred* when its log-sharpness lies far below the training distribution
  (robust z-score: median and MAD of log-sharpness, cut-off at ``BLUR_Z`` deviations).
- **Burned-in text and markers**: bright, small, high-contrast connected components inside the border band
  (side markers such as "R"/"L", annotations, labels), where anatomy does not produce them.

Neither check changes a prediction: the transformer reports them as ``quality_flags``; ``data prepare``
reports them, excludes blurred films only when asked, and can mask detected text in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

ANALYSIS_SIZE = 224
BLUR_Z = 3.5
#: The blur cut-off (variance of the Laplacian at 224 px) that the robust rule gives on the development
#: training data (../shared/data/chest_xray_224/train, 5,216 files: median 112, cut-off 20.2, 13 films below).
#: ``data prepare`` recomputes it on whatever data it ingests; serving uses this one (it is version-free).
DEFAULT_MIN_SHARPNESS = 20.2
FLAG_BLURRED, FLAG_TEXT = "blurred", "text_overlay"
MAX_CANDIDATES = 6000  # bright border pixels beyond this are not text (a white frame): nothing is reported


@dataclass(frozen=True)
class QualityThresholds:
    min_sharpness: float = DEFAULT_MIN_SHARPNESS
    border_band: float = 0.18  # share of each side that counts as "near the border"
    min_brightness: int = 130  # burned-in text and markers are light...
    min_local_contrast: float = 50.0  # ...brighter than their 15-px neighbourhood mean by at least this...
    max_background: float = 90.0  # ...on the dark background outside the body (ribs and bones sit on tissue)
    min_contrast: float = 80.0  # component mean minus the median of the ring around it
    min_area: int = 5  # pixels at 224 px
    max_area: int = 900
    max_extent: float = 0.4  # a component (a glyph, a word) spans at most this share of the side
    min_fill: float = 0.12  # strokes fill a fair part of their bounding box (thin long edges do not)


@dataclass
class QualityReport:
    sharpness: float
    text_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # (y0, x0, y1, x1) in 0..1
    flags: list[str] = field(default_factory=list)


def analysis_pixels(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> uint8 (224, 224), squashed with Pillow's antialiased bilinear filter, like the training
    cache: a full-resolution upload then measures within ~1.3x of its 224 px copy in the development data
    (a box filter keeps aliasing and reads ~2.2x sharper)."""
    gray = np.asarray(gray, dtype=np.uint8)
    if gray.shape == (ANALYSIS_SIZE, ANALYSIS_SIZE):
        return gray
    return np.asarray(Image.fromarray(gray).resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BILINEAR),
                      dtype=np.uint8)


def sharpness(pixels: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (interior pixels) of an analysis-size image."""
    g = pixels.astype(np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def _components(mask: np.ndarray, reach: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Connected components of a sparse boolean mask; pixels up to ``reach`` apart join (one glyph with a
    broken stroke, or one short word, is one component). A flood fill over the set pixels only."""
    ys, xs = np.nonzero(mask)
    remaining = set(zip(ys.tolist(), xs.tolist()))
    offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if dy or dx]
    components = []
    while remaining:
        stack = [remaining.pop()]
        members = list(stack)
        while stack:
            y, x = stack.pop()
            for dy, dx in offsets:
                neighbour = (y + dy, x + dx)
                if neighbour in remaining:
                    remaining.remove(neighbour)
                    stack.append(neighbour)
                    members.append(neighbour)
        coords = np.array(members)
        components.append((coords[:, 0], coords[:, 1]))
    return components


def text_components(pixels: np.ndarray, t: QualityThresholds = QualityThresholds()
                    ) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (relative y0, x0, y1, x1) of bright, small, high-contrast blobs in the border band."""
    size = pixels.shape[0]
    local_mean = np.asarray(Image.fromarray(pixels).filter(ImageFilter.BoxBlur(7)), dtype=np.float32)
    band = int(round(t.border_band * size))
    border = np.ones(pixels.shape, dtype=bool)
    border[band:size - band, band:size - band] = False
    contrast = pixels.astype(np.float32) - local_mean
    candidates = border & (pixels >= t.min_brightness) & (contrast >= t.min_local_contrast)
    if not candidates.any() or candidates.sum() > MAX_CANDIDATES:  # bounded cost on any input
        return []
    boxes = []
    for ys, xs in _components(candidates):
        if len(ys) < t.min_area or len(ys) > t.max_area:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if max(y1 - y0, x1 - x0) > t.max_extent * size or len(ys) / ((y1 - y0) * (x1 - x0)) < t.min_fill:
            continue
        ry0, rx0, ry1, rx1 = max(0, y0 - 4), max(0, x0 - 4), min(size, y1 + 4), min(size, x1 + 4)
        ring = pixels[ry0:ry1, rx0:rx1][~candidates[ry0:ry1, rx0:rx1]]
        background = float(np.median(ring)) if ring.size else 255.0
        if background > t.max_background or float(pixels[ys, xs].mean()) - background < t.min_contrast:
            continue
        boxes.append((y0 / size, x0 / size, y1 / size, x1 / size))
    return boxes


def assess(gray: np.ndarray, thresholds: QualityThresholds = QualityThresholds()) -> QualityReport:
    """Sharpness, text boxes and flags of one decoded gray image (any size)."""
    pixels = analysis_pixels(gray)
    report = QualityReport(sharpness(pixels), text_components(pixels, thresholds))
    if report.sharpness < thresholds.min_sharpness:
        report.flags.append(FLAG_BLURRED)
    if report.text_boxes:
        report.flags.append(FLAG_TEXT)
    return report


def quality_flags(gray: np.ndarray, thresholds: QualityThresholds = QualityThresholds()) -> list[str]:
    """``["blurred", "text_overlay"]``, either, or nothing: what the transformer returns beside a prediction."""
    return assess(gray, thresholds).flags


def sharpness_cutoff(values: np.ndarray, z: float = BLUR_Z) -> float:
    """Blur cut-off from a training distribution: ``z`` robust deviations below the median of log-sharpness."""
    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-6))
    median = float(np.median(logs))
    mad = float(np.median(np.abs(logs - median))) * 1.4826
    return float(np.exp(median - z * max(mad, 1e-6)))


def mask_boxes(pixels: np.ndarray, boxes: list[tuple[float, float, float, float]], pad: float = 0.01) -> np.ndarray:
    """Fill each relative box (grown by ``pad``) with the median of a ring around it: the marker is gone and
    no new bright or black blob takes its place."""
    out = np.array(pixels, dtype=np.uint8, copy=True)
    h, w = out.shape
    for y0, x0, y1, x1 in boxes:
        top, left = max(0, int(np.floor((y0 - pad) * h))), max(0, int(np.floor((x0 - pad) * w)))
        bottom, right = min(h, int(np.ceil((y1 + pad) * h))), min(w, int(np.ceil((x1 + pad) * w)))
        ring_t, ring_l = max(0, top - 3), max(0, left - 3)
        ring = out[ring_t:min(h, bottom + 3), ring_l:min(w, right + 3)].astype(np.float32)
        inner = np.zeros(ring.shape, dtype=bool)
        inner[top - ring_t:bottom - ring_t, left - ring_l:right - ring_l] = True
        fill = np.median(ring[~inner]) if (~inner).any() else np.median(ring)
        out[top:bottom, left:right] = np.uint8(round(float(fill)))
    return out
