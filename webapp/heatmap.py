"""The heatmap as the web app shows it: the model's class-activation map (CAM), its share inside the lungs, and the
overlay of the PDF report, drawn the way the page's viewer draws it.

The viewer (``static/viewer.js``) upsamples the CAM grid to the film's own resolution, colours it with a
perceptually uniform map (``static/colormaps.json``: viridis, inferno, cividis) and leaves it transparent
below a cut-off, so only the regions that drove the score are coloured. The PDF uses the same maps, the same
cut-off and the same interpolation (bilinear, pixel centres aligned) from here.

The lung share is the share of the CAM's positive mass inside the lung fields: the model server's own figure
when it sends one (``cam_lung_share``, from a lung segmentation model), otherwise computed here on the
lung-field prior of :mod:`model.quality` (two fixed ellipses: a prior, not a segmentation), and labelled so.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from model.quality import lung_fields

COLORMAPS_FILE = Path(__file__).resolve().parent / "static" / "colormaps.json"
COLORMAP_NAMES = ("viridis", "inferno", "cividis")
DEFAULT_COLORMAP = "viridis"
#: CAM values (relative to the film's maximum) below this are not coloured.
DEFAULT_CUTOFF = 0.4
#: Grid of the lung-field prior sent to the viewer (upsampled there like the CAM).
PRIOR_GRID = 64
#: Resolution at which the lung share is computed (the CAM and the mask are upsampled to it).
SHARE_GRID = 224
SOURCE_MODEL, SOURCE_PRIOR = "lung model", "lung-field prior"


@functools.lru_cache(maxsize=1)
def colormaps() -> dict[str, np.ndarray]:
    data = json.loads(COLORMAPS_FILE.read_text())
    return {name: np.asarray(data[name], dtype=np.uint8) for name in COLORMAP_NAMES}


def grid_array(grid: dict) -> np.ndarray:
    return np.asarray(grid["values"], dtype=np.float32).reshape(grid["rows"], grid["cols"])


def as_grid(values: np.ndarray, digits: int = 4) -> dict:
    rows, cols = values.shape
    return {"rows": int(rows), "cols": int(cols), "values": [round(float(v), digits) for v in values.ravel()]}


def upsample(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear, pixel centres aligned (what a canvas draws when it scales an image up with smoothing)."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def lung_prior_grid() -> dict:
    """The lung-field prior as a PRIOR_GRID x PRIOR_GRID grid of 0/1, in the CAM's frame (the whole film)."""
    return as_grid(lung_fields(PRIOR_GRID, PRIOR_GRID).astype(np.float32), 0)


def lung_share(cam: dict, mask: dict) -> float | None:
    """Share of the CAM's positive mass inside the mask (both grids over the whole film); None without mass."""
    heat = np.maximum(upsample(grid_array(cam), SHARE_GRID, SHARE_GRID), 0.0)
    inside = upsample(grid_array(mask), SHARE_GRID, SHARE_GRID) >= 0.5
    total = float(heat.sum())
    return round(float(heat[inside].sum()) / total, 4) if total > 0 else None


def overlay_png(film: bytes, cam: dict, colormap: str = DEFAULT_COLORMAP, cutoff: float = DEFAULT_CUTOFF,
                mask: dict | None = None, max_side: int = 1200, opacity: float = 0.6) -> bytes:
    """The film (any format Pillow reads) with the CAM drawn over it at the film's resolution: coloured from the
    cut-off up, transparent below it; ``mask`` keeps only the regions inside it (the lung-restricted view)."""
    with Image.open(io.BytesIO(film)) as image:
        gray = image.convert("L")
    out = io.BytesIO()
    overlay_image(gray, cam, colormap, cutoff, mask, max_side, opacity).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def overlay_image(film: Image.Image, cam: dict, colormap: str = DEFAULT_COLORMAP, cutoff: float = DEFAULT_CUTOFF,
                  mask: dict | None = None, max_side: int = 1200, opacity: float = 0.6) -> Image.Image:
    """:func:`overlay_png` on a film already decoded (``film`` is not changed): an RGB image, no PNG round trip."""
    gray = film.convert("L") if film.mode != "L" else film.copy()
    gray.thumbnail((max_side, max_side))
    width, height = gray.size
    heat = np.clip(upsample(grid_array(cam), width, height), 0.0, 1.0)
    if mask is not None:
        heat = np.where(upsample(grid_array(mask), width, height) >= 0.5, heat, 0.0)
    colours = colormaps()[colormap][np.round(heat * 255).astype(np.uint8)].astype(np.float32)
    alpha = np.where(heat >= cutoff, opacity, 0.0)[..., None]
    base = np.repeat(np.asarray(gray, dtype=np.float32)[..., None], 3, axis=2)
    blended = np.round(base * (1 - alpha) + colours * alpha).astype(np.uint8)
    return Image.fromarray(blended)


def colour_scale_png(colormap: str = DEFAULT_COLORMAP, cutoff: float = DEFAULT_CUTOFF, width: int = 512,
                     height: int = 24) -> bytes:
    """The scale bar of the PDF: the map from 0 to 1, grey (not coloured) below the cut-off."""
    ramp = np.linspace(0.0, 1.0, width)
    colours = colormaps()[colormap][np.round(ramp * 255).astype(np.uint8)]
    colours[ramp < cutoff] = (200, 200, 200)
    out = io.BytesIO()
    Image.fromarray(np.repeat(colours[None], height, axis=0)).save(out, format="PNG")
    return out.getvalue()
