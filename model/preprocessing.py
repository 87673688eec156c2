"""The ONE preprocessing definition: decode -> grayscale -> resize -> normalise.

Training (cache building, evaluation) and serving (the KServe transformer) call exactly these
functions, so the served model sees the pixels training saw. The parameters travel with the model
in the registry as ``PreprocessConfig.to_dict()``.

No torch import here: the serving image does not ship torch.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Files larger than this many pixels are refused before decoding (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 40_000_000
#: Images whose shorter side is below this are unusable for a chest X-ray.
DEFAULT_MIN_SIDE = 64

PREPROCESSING_VERSION = 1


class InvalidImageError(ValueError):
    """An input that cannot be turned into a model tensor. ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
    # Per-image mean intensity (0-255) of the training images: the serving gate rejects inputs far
    # outside it (a photograph of a cat, an all-black frame).
    train_intensity_mean: float = 120.0
    train_intensity_std: float = 30.0
    version: int = PREPROCESSING_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if known.get("version", PREPROCESSING_VERSION) != PREPROCESSING_VERSION:
            raise ValueError(f"preprocessing version {known['version']} is not supported")
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


def decode(data: bytes, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           min_side: int = DEFAULT_MIN_SIDE, config: PreprocessConfig | None = None) -> DecodedImage:
    """Decode JPEG/PNG/DICOM bytes to 8-bit grayscale (resized to ``config`` when given).

    ``draft_size``: let the JPEG decoder downscale in the DCT domain to no less than this size
    (much faster for full-resolution radiographs; the result is still resized afterwards).
    """
    if not data:
        raise InvalidImageError("empty", "the file is empty")
    if is_dicom(data):
        from model.dicom import decode_dicom  # pydicom only when needed

        pixels = decode_dicom(data)
        image = DecodedImage(resize(pixels, config) if config else pixels, "DICOM",
                             (pixels.shape[1], pixels.shape[0]), 0.0)
    else:
        image = _decode_raster(data, draft_size, max_pixels, config)
    width, height = image.original_size
    if min(width, height) < min_side:
        raise InvalidImageError("too_small", f"image is {width}x{height}; at least {min_side} px per side is needed")
    return image


def _decode_raster(data: bytes, draft_size: int | None, max_pixels: int,
                   config: PreprocessConfig | None) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImageError("too_large", f"image is {width}x{height}; at most {max_pixels} pixels are accepted")
            fmt = img.format or "unknown"
            if fmt not in ("JPEG", "PNG", "TIFF", "BMP"):
                raise InvalidImageError("unsupported_format", f"{fmt} images are not supported; send JPEG, PNG or DICOM")
            if draft_size and fmt == "JPEG":
                # DCT-domain downscale: never below the requested size, so quality is kept.
                img.draft("L" if img.mode == "L" else "RGB", (draft_size, draft_size))
            img.load()  # truncated files raise here
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError("too_large", f"image is too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImageError("not_an_image", "the data is not a JPEG, PNG or DICOM image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError("corrupt", f"the image could not be decoded (truncated or corrupt): {exc}") from None

    colourfulness = 0.0
    if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        step = max(1, min(rgb.shape[:2]) // 256)  # a subsample is enough for a colour test
        sub = rgb[::step, ::step]
        colourfulness = float(np.mean(np.abs(sub[..., 0] - sub[..., 1]) + np.abs(sub[..., 1] - sub[..., 2])))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = _rescale_to_uint8(np.asarray(img, dtype=np.float32))
        if config:
            pixels = resize(pixels, config)
    else:
        gray = img.convert("L")
        if config and gray.size != (config.image_size, config.image_size):
            gray = _fit_square(gray, config)
        pixels = np.asarray(gray, dtype=np.uint8)
    return DecodedImage(np.ascontiguousarray(pixels), fmt, (width, height), colourfulness)


def _rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def resize(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (H, W) to (size, size): squashed, or fitted and padded (``config.resize_mode``)."""
    size = config.image_size
    if pixels.shape == (size, size):
        return pixels
    return np.asarray(_fit_square(Image.fromarray(pixels), config), dtype=np.uint8)


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


def load_resized(data: bytes, config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode and resize to the model resolution: the uint8 image that the cache stores."""
    return decode(data, draft_size=config.image_size, max_pixels=max_pixels, config=config)


def normalize(batch: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (N, H, W) or (H, W) -> float32 (N, 1, H, W) network input."""
    if batch.ndim == 2:
        batch = batch[None]
    batch = apply_field_mask(batch, config)
    scale = np.float32(1.0 / (255.0 * config.std))
    offset = np.float32(config.mean / config.std)
    return (batch.astype(np.float32) * scale - offset)[:, None]


def to_tensor(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Encoded file -> float32 (1, 1, S, S): the full serving path."""
    return normalize(load_resized(data, config).pixels, config)
