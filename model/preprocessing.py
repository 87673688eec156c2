"""The ONE preprocessing definition, in two stages.

1. **Decode** (version-independent): encoded JPEG/PNG/DICOM -> 8-bit grayscale, at most
   :data:`DECODED_MAX_SIDE` pixels per side (JPEGs are drafted in the DCT domain, then area-reduced).
   Its cost is bounded before the expensive work: pixel counts are checked from the header, DICOM
   transfer syntaxes are allowlisted and only the first frame is decoded.
2. **Model input** (the model version's): squash-resize to ``PreprocessConfig.image_size`` and
   normalise with the version's mean/std.

Training (cache building, evaluation) runs both stages back to back. Serving splits them: the
transformer runs stage 1 (it knows nothing of model versions) and sends the bounded pixels; the
predictor runs stage 2 with the parameters of the version it serves. So the served model sees
exactly the pixels training saw, and no pairing of revisions can mix two versions' preprocessing.

No torch import here: the serving image does not ship torch.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.errors import InvalidImageError

#: Files larger than this many pixels are refused before decoding (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 40_000_000
#: Images whose shorter side is below this are unusable for a chest X-ray.
DEFAULT_MIN_SIDE = 64
#: Stage 1 bounds every decoded image to this many pixels per side: the largest model input it can
#: feed (``image_size`` <= this), the heatmap's canvas, and the size of what travels to the predictor.
DECODED_MAX_SIDE = 512
#: JPEGs are drafted in the DCT domain to no less than this on the longer side (a power-of-two reduction,
#: so they come out between this and twice it): the entropy decoding costs the same, but a 2800 px
#: radiograph then decodes in about half the time of a 512 px draft (BENCHMARKS.md, preprocessing).
JPEG_DRAFT_SIDE = DECODED_MAX_SIDE // 2

#: 2: stage 1 bounds images to DECODED_MAX_SIDE (JPEG drafted at that bound, not at the model size).
PREPROCESSING_VERSION = 2
#: Stage-2 lung options (``PreprocessConfig.lung_crop``); ``model.lung_fields`` computes the mask.
LUNG_CROPS = ("none", "box", "mask", "box+mask")
#: A lung mask covering less than this share of the image is not trusted to place a crop (no lungs found).
MIN_LUNG_AREA = 0.05
#: "mask": the lung mask is dilated by this many pixels of the segmentation frame (of 128) before blanking,
#: so the hila, the retrocardiac lung and the costophrenic angles stay visible.
LUNG_MASK_DILATION = 6


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn an encoded file into the network's input tensor."""

    image_size: int = 224
    # Intensity normalisation of [0, 1] pixels; set from the training cache by ``data prepare``.
    mean: float = 0.5
    std: float = 0.25
    # Resize is a squash to a square, as in the public 224 px copies of the data set ("squash"), or
    # aspect-preserving with black padding ("pad").
    resample: str = "bilinear"
    resize_mode: str = "squash"
    # "ellipse": pixels outside a fixed elliptical lung-field prior are set to the mean (~0 after
    # normalisation) before the network sees them, in training and serving alike.
    field_mask: str = "none"
    # Lung fields (``model.lung_fields``; the segmentation graph travels in the bundle): "box" crops the stage-1
    # image to the lungs' bounding box widened by ``lung_margin`` before the resize, "mask" blanks what lies
    # outside the (dilated) lungs, "box+mask" does both. The segmenter runs on the stage-1 pixels in the
    # training cache and in the predictor alike, so both compute the same pixels.
    lung_crop: str = "none"
    lung_margin: float = 0.1
    # Per-image mean intensity (0-255) of the training images, recorded with the model (the serving
    # gate uses absolute bounds that hold for every radiograph, so that it needs no model version).
    train_intensity_mean: float = 120.0
    train_intensity_std: float = 30.0
    version: int = PREPROCESSING_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= int(self.image_size) <= DECODED_MAX_SIDE:
            raise ValueError(f"image_size {self.image_size} is outside 1..{DECODED_MAX_SIDE} (stage 1 bounds "
                             f"decoded images to {DECODED_MAX_SIDE} px per side)")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r} ({', '.join(_RESAMPLE)})")
        if self.lung_crop not in LUNG_CROPS:
            raise ValueError(f"unknown lung crop {self.lung_crop!r} ({', '.join(LUNG_CROPS)})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:  # a stage this code does not run: serving the model would feed it other pixels
            raise ValueError(f"the model's preprocessing names {', '.join(unknown)}, which this code does not know; "
                             "update pneumoscope to serve it")
        if known.get("version", PREPROCESSING_VERSION) != PREPROCESSING_VERSION:
            raise ValueError(f"preprocessing version {known['version']} is not supported by this code (version "
                             f"{PREPROCESSING_VERSION}): the model was trained on pixels this code no longer "
                             "produces; rebuild the cache and retrain")
        return cls(**known)


@dataclass
class DecodedImage:
    pixels: np.ndarray  # uint8 (H, W), grayscale
    source_format: str  # "JPEG", "PNG", "DICOM", ...
    original_size: tuple[int, int]  # (width, height) before any draft reduction
    colourfulness: float  # mean |R-G|+|G-B| over the image, 0 for true grayscale


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX,
             "bicubic": Image.Resampling.BICUBIC}


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def bounded_size(width: int, height: int, max_side: int = DECODED_MAX_SIDE) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is at most ``max_side`` (aspect ratio kept)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# -- stage 1: decode (version-independent) -----------------------------------------------------------

def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
           max_dicom_bytes: int | None = None) -> DecodedImage:
    """Decode JPEG/PNG/DICOM bytes to 8-bit grayscale of at most DECODED_MAX_SIDE pixels per side.

    ``max_pixels`` bounds width*height as the file declares it, checked before decoding;
    ``max_dicom_bytes`` bounds a DICOM file's declared Rows x Columns x frames x bytes per sample.
    """
    if not data:
        raise InvalidImageError("empty", "the file is empty")
    if is_dicom(data):
        from model.dicom import decode_dicom  # pydicom only when needed

        pixels = decode_dicom(data, max_pixels, max_dicom_bytes)
        height, width = pixels.shape
        image = DecodedImage(_bound(pixels), "DICOM", (width, height), 0.0)
    else:
        image = _decode_raster(data, max_pixels)
    width, height = image.original_size
    if min(width, height) < min_side:
        raise InvalidImageError("too_small", f"image is {width}x{height}; at least {min_side} px per side is needed")
    return image


def declared_pixels(data: bytes) -> int:
    """width*height as the file's header declares it, without decoding (0 when it cannot be told)."""
    try:
        if is_dicom(data):
            from model.dicom import declared_pixels as dicom_pixels

            return dicom_pixels(data)
        width, height = Image.open(io.BytesIO(data)).size
        return int(width) * int(height)
    except Exception:  # unreadable headers are reported by decode(), with their reason
        return 0


def _bound(pixels: np.ndarray) -> np.ndarray:
    """Area-reduce uint8 (H, W) so that neither side exceeds DECODED_MAX_SIDE."""
    height, width = pixels.shape
    size = bounded_size(width, height)
    if size == (width, height):
        return np.ascontiguousarray(pixels)
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX), dtype=np.uint8)


def _decode_raster(data: bytes, max_pixels: int) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:  # from the header: nothing is decoded yet
                raise InvalidImageError("too_large", f"image is {width}x{height}; at most {max_pixels} pixels are "
                                                     "accepted")
            fmt = img.format or "unknown"
            if fmt not in ("JPEG", "PNG", "TIFF", "BMP"):
                raise InvalidImageError("unsupported_format", f"{fmt} images are not supported; send JPEG, PNG or "
                                                              "DICOM")
            if fmt == "JPEG":
                # DCT-domain downscale: a full-resolution radiograph decodes at 1/2..1/8 of its size.
                img.draft("L" if img.mode == "L" else "RGB", bounded_size(width, height, JPEG_DRAFT_SIDE))
            img.load()  # truncated files raise here
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError("too_large", f"image is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImageError("not_an_image", "the data is not a JPEG, PNG or DICOM image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError("corrupt", f"the image could not be decoded (truncated or corrupt): {exc}") from None

    colourfulness = 0.0
    if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
        rgb = np.asarray(img.convert("RGB"))
        step = max(1, min(rgb.shape[:2]) // 256)  # a subsample is enough for a colour test
        sub = rgb[::step, ::step].astype(np.int16)
        colourfulness = float(np.mean(np.abs(sub[..., 0] - sub[..., 1]) + np.abs(sub[..., 1] - sub[..., 2])))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = _rescale_to_uint8(np.asarray(img, dtype=np.float32))
    else:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    return DecodedImage(_bound(pixels), fmt, (width, height), colourfulness)


def _rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


# -- stage 2: the model version's input ---------------------------------------------------------------

def resize(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (H, W) to (size, size): squashed, or fitted and padded (``config.resize_mode``)."""
    size = config.image_size
    if pixels.shape == (size, size):
        return pixels
    return np.asarray(_fit_square(Image.fromarray(np.ascontiguousarray(pixels)), config), dtype=np.uint8)


def _fit_square(gray: Image.Image, config: PreprocessConfig) -> Image.Image:
    size, resample = config.image_size, _RESAMPLE[config.resample]
    if config.resize_mode == "squash":
        return gray.resize((size, size), resample)
    if config.resize_mode != "pad":
        raise ValueError(f"unknown resize mode {config.resize_mode!r} (squash or pad)")
    width, height = gray.size
    scale = size / max(width, height)
    fitted = gray.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return canvas


@functools.lru_cache(maxsize=16)
def field_mask(height: int, width: int, kind: str = "ellipse") -> np.ndarray:
    """bool (H, W), True inside a fixed elliptical lung-field prior: the chest of a centred frontal film,
    without the corners and edges where side markers, text and the shoulders sit. A prior, not a segmentation."""
    if kind != "ellipse":
        raise ValueError(f"unknown field mask {kind!r} (none or ellipse)")
    y, x = np.mgrid[0:height, 0:width]
    cy, cx, ry, rx = 0.53 * height, 0.5 * width, 0.47 * height, 0.47 * width
    return ((y + 0.5 - cy) / ry) ** 2 + ((x + 0.5 - cx) / rx) ** 2 <= 1.0


def apply_field_mask(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (..., H, W): outside the field set to the uint8 nearest the normalisation mean (~0 after ``normalize``)."""
    if config.field_mask == "none":
        return pixels
    inside = field_mask(pixels.shape[-2], pixels.shape[-1], config.field_mask)
    return np.where(inside, pixels, np.uint8(round(255 * config.mean)))


def normalize(batch: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (N, H, W) or (H, W) -> float32 (N, 1, H, W) network input."""
    if batch.ndim == 2:
        batch = batch[None]
    batch = apply_field_mask(batch, config)
    scale = np.float32(1.0 / (255.0 * config.std))
    offset = np.float32(config.mean / config.std)
    return (batch.astype(np.float32) * scale - offset)[:, None]


def lung_view(pixels: np.ndarray, config: PreprocessConfig, lung_mask: np.ndarray | None):
    """Stage 2's resize for every model: uint8 stage-1 pixels (H, W) -> (the uint8 (S, S) model input, the
    (top, left, bottom, right) region of the stage-1 image it shows, in fractions).

    ``lung_mask`` (bool, in ``model.lung_fields.LungSegmenter``'s frame: the stage-1 image squashed to a square)
    is needed when the version was trained with ``lung_crop``; "box" crops to the lungs' box widened by
    ``lung_margin`` (the whole image when the mask is too small to trust), "mask" sets what lies outside the
    dilated lungs to 0.
    """
    whole = (0.0, 0.0, 1.0, 1.0)
    if config.lung_crop == "none":
        return resize(pixels, config), whole
    if lung_mask is None:
        raise ValueError(f"this model crops to the lungs ({config.lung_crop!r}): it needs the lung mask of each image")
    box = lung_box(lung_mask, config.lung_margin) if "box" in config.lung_crop else None
    shown = pixels
    if "mask" in config.lung_crop:
        grown = dilate(lung_mask, LUNG_MASK_DILATION)
        if grown.mean() > 0:  # no lungs found: nothing is blanked (as nothing is cropped)
            shown = np.where(resize_mask(grown, *pixels.shape), pixels, np.uint8(0))
    return resize(np.ascontiguousarray(crop(shown, box)), config), box or whole


def lung_box(mask: np.ndarray, margin: float = 0.1,
             min_area: float = MIN_LUNG_AREA) -> tuple[float, float, float, float] | None:
    """(top, left, bottom, right) in fractions of the image: the lungs' bounding box widened by ``margin`` of
    its own height/width on each side, clipped to the image; None when the mask covers less than ``min_area``."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    if mask.mean() < min_area:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0] / height, (rows[-1] + 1) / height, cols[0] / width, (cols[-1] + 1) / width
    dy, dx = margin * (bottom - top), margin * (right - left)
    return (max(0.0, top - dy), max(0.0, left - dx), min(1.0, bottom + dy), min(1.0, right + dx))


def box_pixels(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """The box on an image of (height, width), widened to whole pixels (floor the start, ceil the end)."""
    top, left, bottom, right = box
    y0, x0 = int(np.floor(top * height)), int(np.floor(left * width))
    y1, x1 = int(np.ceil(bottom * height)), int(np.ceil(right * width))
    return max(0, y0), max(0, x0), min(height, max(y1, y0 + 1)), min(width, max(x1, x0 + 1))


def crop(pixels: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
    """The part of ``pixels`` inside ``box`` (all of it for None)."""
    if box is None:
        return pixels
    y0, x0, y1, x1 = box_pixels(box, *pixels.shape[-2:])
    return pixels[..., y0:y1, x0:x1]


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool mask to (height, width), nearest neighbour."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (height, width):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)) > 127


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """bool mask grown by ``pixels`` in every direction (a square max filter, Pillow's)."""
    from PIL import ImageFilter

    if pixels <= 0:
        return np.asarray(mask, dtype=bool)
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 127


# -- both stages: what the training cache stores ----------------------------------------------------

def load_resized(data: bytes, config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                 segmenter=None) -> DecodedImage:
    """Stage 1 then the resize of stage 2: the uint8 (S, S) image that the cache stores. A version trained with
    ``lung_crop`` needs ``segmenter`` (``model.lung_fields.LungSegmenter``), run on the stage-1 pixels as the
    predictor runs it."""
    image = decode(data, max_pixels=max_pixels)
    mask = segmenter.mask(image.pixels) if segmenter is not None and config.lung_crop != "none" else None
    image.pixels, _ = lung_view(image.pixels, config, mask)
    return image


def to_tensor(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Encoded file -> float32 (1, 1, S, S): the full path, as the predictor computes it."""
    return normalize(load_resized(data, config).pixels, config)
