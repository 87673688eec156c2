"""Image-quality checks that neither training nor serving decisions depend on: blur, burned-in text, objects
over the lungs.

No torch, no OpenCV: numpy and Pillow only, so the KServe transformer runs exactly these functions on the
gray pixels it decoded, and ``data prepare`` runs them on every training image.

- **Sharpness**: the variance of the Laplacian at a fixed analysis resolution (224 px, the resolution of the
  development data and of the ``gpu`` profile), so that a full-resolution upload and a 224 px training copy
  are measured alike. A film is *blurred* when its log-sharpness lies far below the training distribution
  (robust z-score: median and MAD of log-sharpness, cut-off at ``BLUR_Z`` deviations).
- **Burned-in text and markers**: bright, small, high-contrast connected components inside the border band
  (side markers such as "R"/"L", annotations, labels), where anatomy does not produce them. They are
  *detected* (``data prepare --mask-text`` paints them out of the training cache) but they are not a
  warning: every film carries a side marker, and a corner label hides no lung.
- **Text or objects over the lung fields**: much brighter, small, compact blobs inside a fixed prior of
  the two lung fields (:func:`lung_fields`): electrodes, clips, buttons, text printed over the chest. They
  may hide or mimic an opacity, so they are a warning.

Detection is separate from warning: :class:`QualityReport` holds what was found (``text_boxes``,
``lung_boxes``) and ``flags``, the warnings, each with what the reader should do (:data:`ADVICE`).
No check changes a prediction: the transformer reports the warnings as ``quality_flags``; ``data prepare``
reports them, excludes blurred films only when asked, and can mask detected text in the cache. How often
each flag fires on the development data is in BENCHMARKS.md ("Quality flags"; ``benchmarks/quality_flags.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

ANALYSIS_SIZE = 224
BLUR_Z = 3.5
#: The blur cut-off (variance of the Laplacian at 224 px) that the robust rule gives on the development
#: training data (../shared/data/chest_xray_224/train, 5,216 files: median 112, cut-off 20.2, 13 films below).
#: ``data prepare`` recomputes it on whatever data it ingests; serving uses this one (it is version-free).
DEFAULT_MIN_SHARPNESS = 20.2
#: ``FLAG_TEXT`` names detected markers and text (a record of the training data, never a warning).
FLAG_BLURRED, FLAG_TEXT, FLAG_OVER_LUNGS = "blurred", "text_overlay", "object_over_lungs"
#: The warnings, in words, with what to do: (what it is, what to do). The web app, the report and the DICOM
#: results take their wording from here.
ADVICE = {
    FLAG_BLURRED: ("The film is blurred (motion or focus): fine detail such as an early opacity may be lost.",
                   "Repeat the film if the finding matters; otherwise read with care."),
    FLAG_OVER_LUNGS: ("Text or an object (an electrode, a clip, a button) lies over a lung field: it may hide or "
                      "mimic an opacity, and the model may react to it.",
                      "Read with care; repeat the film without the object if it hides the finding."),
}
#: The two lung fields of a centred frontal film as ellipses (centre y, centre x, radius y, radius x, as shares of
#: the image's height and width): a prior, not a segmentation, drawn on the development films.
LUNG_FIELDS = ((0.45, 0.30, 0.28, 0.16), (0.45, 0.70, 0.28, 0.16))
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
    # Over the lung fields the background is tissue, not air outside the body: an object must stand out far more
    # than a rib's edge does (on the development data these cut-offs fire on 0.3 % of the films; BENCHMARKS.md).
    lung_min_brightness: int = 180
    lung_min_local_contrast: float = 60.0
    lung_min_contrast: float = 100.0


@dataclass
class QualityReport:
    sharpness: float
    #: markers and text near the border, (y0, x0, y1, x1) in 0..1: detected (for masking), never a warning
    text_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: text or objects over the lung fields, same form: a warning
    lung_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: the warnings (keys of ADVICE)
    flags: list[str] = field(default_factory=list)

    @property
    def detections(self) -> list[str]:
        """The warnings plus ``text_overlay`` when markers or text were found: what ``data prepare`` records."""
        return self.flags + ([FLAG_TEXT] if self.text_boxes else [])


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
    broken stroke, or one short word, is one component).

    Vectorised over the set pixels only (the serving image has no scipy): the pairs of set pixels within
    ``reach`` of each other, found through an index image, then the smallest index spread along those pairs
    with pointer jumping, a few passes even for a long stroke. It runs on every upload in the transformer,
    where the flood fill in Python it replaces cost about 0.7 ms per film."""
    ys, xs = np.nonzero(mask)
    count = len(ys)
    if count == 0:
        return []
    height, width = mask.shape
    index = np.full((height + 2 * reach, width + 2 * reach), -1, dtype=np.int64)
    index[ys + reach, xs + reach] = np.arange(count)
    firsts, seconds = [], []
    for dy in range(reach + 1):  # half of the neighbourhood: each pair once
        for dx in range(-reach, reach + 1):
            if dy == 0 and dx <= 0:
                continue
            other = index[ys + reach + dy, xs + reach + dx]
            found = other >= 0
            firsts.append(np.flatnonzero(found))
            seconds.append(other[found])
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    label = np.arange(count)
    while True:
        lowest = np.minimum(label[first], label[second])
        spread = label.copy()
        np.minimum.at(spread, first, lowest)
        np.minimum.at(spread, second, lowest)
        spread = spread[spread]  # pointer jumping: each pixel takes its label's label
        if np.array_equal(spread, label):
            break
        label = spread
    order = np.argsort(label, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(label[order])) + 1)
    return [(ys[group], xs[group]) for group in groups]


@functools.lru_cache(maxsize=4)
def lung_fields(height: int, width: int) -> np.ndarray:
    """bool (H, W), True inside the two lung-field ellipses of :data:`LUNG_FIELDS`."""
    y, x = np.mgrid[0:height, 0:width]
    inside = np.zeros((height, width), dtype=bool)
    for cy, cx, ry, rx in LUNG_FIELDS:
        inside |= ((y + 0.5 - cy * height) / (ry * height)) ** 2 + ((x + 0.5 - cx * width) / (rx * width)) ** 2 <= 1
    return inside


def local_contrast(pixels: np.ndarray) -> np.ndarray:
    """Each pixel minus the mean of its 15-px neighbourhood (float32)."""
    local_mean = np.asarray(Image.fromarray(pixels).filter(ImageFilter.BoxBlur(7)), dtype=np.float32)
    return pixels.astype(np.float32) - local_mean


def _bright_blobs(pixels: np.ndarray, region: np.ndarray, min_brightness: int, min_local_contrast: float,
                  min_contrast: float, max_background: float, t: QualityThresholds,
                  contrast: np.ndarray | None = None) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (relative y0, x0, y1, x1) of bright, small, compact blobs inside ``region`` that stand out
    from their 15-px neighbourhood and from the ring around them (``contrast``: :func:`local_contrast`, when the
    caller has it already)."""
    size = pixels.shape[0]
    contrast = local_contrast(pixels) if contrast is None else contrast
    candidates = region & (pixels >= min_brightness) & (contrast >= min_local_contrast)
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
        if background > max_background or float(pixels[ys, xs].mean()) - background < min_contrast:
            continue
        boxes.append((y0 / size, x0 / size, y1 / size, x1 / size))
    return boxes


def text_components(pixels: np.ndarray, t: QualityThresholds = QualityThresholds(),
                    contrast: np.ndarray | None = None) -> list[tuple[float, float, float, float]]:
    """Markers and text: bright, small, high-contrast blobs on the dark background of the border band."""
    size = pixels.shape[0]
    band = int(round(t.border_band * size))
    border = np.ones(pixels.shape, dtype=bool)
    border[band:size - band, band:size - band] = False
    return _bright_blobs(pixels, border, t.min_brightness, t.min_local_contrast, t.min_contrast, t.max_background, t,
                         contrast)


def objects_over_lungs(pixels: np.ndarray, t: QualityThresholds = QualityThresholds(),
                       contrast: np.ndarray | None = None) -> list[tuple[float, float, float, float]]:
    """Text or objects over the lung fields: blobs far brighter than the lung around them."""
    region = lung_fields(*pixels.shape)
    return _bright_blobs(pixels, region, t.lung_min_brightness, t.lung_min_local_contrast, t.lung_min_contrast,
                         255.0, t, contrast)


def assess(gray: np.ndarray, thresholds: QualityThresholds = QualityThresholds(), find_text: bool = True
           ) -> QualityReport:
    """Sharpness, what was found (markers, objects over the lungs) and the warnings of one gray image (any size).
    ``find_text=False`` skips the search for markers near the border (``text_boxes`` stays empty): they are never
    a warning, and on a 224 px film the search cost about half of the assessment."""
    pixels = analysis_pixels(gray)
    contrast = local_contrast(pixels)  # once for both searches
    report = QualityReport(sharpness(pixels), text_components(pixels, thresholds, contrast) if find_text else [],
                           objects_over_lungs(pixels, thresholds, contrast))
    if report.sharpness < thresholds.min_sharpness:
        report.flags.append(FLAG_BLURRED)
    if report.lung_boxes:
        report.flags.append(FLAG_OVER_LUNGS)
    return report


def quality_flags(gray: np.ndarray, thresholds: QualityThresholds = QualityThresholds()) -> list[str]:
    """The warnings: ``["blurred", "object_over_lungs"]``, either, or nothing: what the transformer returns beside
    a prediction. Side markers and corner labels are not among them."""
    return assess(gray, thresholds, find_text=False).flags


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
