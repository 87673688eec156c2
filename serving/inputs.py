"""Turning request payloads into model tensors, and refusing what is not a chest X-ray.

Decoding goes through ``model.preprocessing`` (the code path training used). The X-ray gate on top
of it rejects colour pictures, near-uniform frames and images whose mean intensity lies far outside
the training distribution. Thresholds were set on every real X-ray in ``shared/data`` (5,432 files):
colourfulness 0 for all of them (including the RGB-stored JPEGs), pixel sd at least 19.9, mean
intensity 61-222 of 255 -- so none of them is rejected.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass

import numpy as np

from model.preprocessing import DecodedImage, InvalidImageError, PreprocessConfig, decode, load_resized
from serving.errors import RequestRejected
from serving.metrics import reject_count
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF")
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_STATUS = {"too_large": 413, "not_grayscale": 422, "out_of_distribution": 422, "low_contrast": 422}


def reject(code: str, message: str, status: int | None = None) -> RequestRejected:
    """Count the rejection and build the error to raise."""
    reject_count(code)
    return RequestRejected(code, message, status or _STATUS.get(code, 400))


def _looks_like_file(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (len(data) >= 132 and data[128:132] == b"DICM")


def b64decode(text: str, where: str) -> bytes:
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise reject("invalid_base64", f"{where} is not valid base64") from None


def element_bytes(value, where: str) -> bytes:
    """One BYTES tensor element (or v1 ``b64`` field): raw file bytes, or base64 text of them."""
    if isinstance(value, str):
        return b64decode(value, where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if _looks_like_file(raw) or not raw:
            return raw
        try:  # a client that put base64 text into a BYTES tensor
            return base64.b64decode(raw, validate=True) or raw
        except (binascii.Error, ValueError):
            return raw  # let the decoder say what it is not
    raise reject("invalid_request", f"{where} must be bytes or a base64 string, not {type(value).__name__}")


@dataclass
class PreparedImage:
    pixels: np.ndarray  # uint8 (S, S): what the network sees
    source_format: str
    original_size: tuple[int, int]
    data: bytes  # the encoded file, kept for rendering a heatmap


def check_xray(image: DecodedImage, config: PreprocessConfig, settings: ServingSettings, where: str) -> None:
    """Refuse colour pictures, blank frames and far-out-of-distribution intensities."""
    if image.colourfulness > settings.max_colourfulness:
        raise reject("not_grayscale", f"{where} is a colour picture (colourfulness {image.colourfulness:.1f} > "
                                      f"{settings.max_colourfulness}); send a grayscale chest X-ray")
    pixels = image.pixels
    contrast = float(pixels.std())
    if contrast < settings.min_contrast:
        raise reject("low_contrast", f"{where} is nearly uniform (pixel sd {contrast:.1f} < {settings.min_contrast}); "
                                     "not a radiograph")
    sd = max(float(config.train_intensity_std), settings.intensity_sd_floor)
    mean = float(pixels.mean())
    z = (mean - float(config.train_intensity_mean)) / sd
    if z < -settings.intensity_z_below or z > settings.intensity_z_above:
        side = "darker" if z < 0 else "brighter"
        raise reject("out_of_distribution", f"{where} has mean intensity {mean:.0f}/255, {abs(z):.1f} sd {side} than "
                                            f"the training X-rays ({config.train_intensity_mean:.0f}/255); not a chest "
                                            "X-ray as the model knows them")


def prepare_image(data: bytes, config: PreprocessConfig, settings: ServingSettings, where: str = "the image"
                  ) -> PreparedImage:
    """Encoded JPEG/PNG/DICOM -> uint8 image at the model resolution, through the training code path."""
    if len(data) > settings.max_payload_bytes:
        raise reject("too_large", f"{where} is {len(data)} bytes; at most {settings.max_payload_bytes} are accepted")
    try:
        image = load_resized(data, config, max_pixels=settings.max_image_pixels)
    except InvalidImageError as exc:
        raise reject(exc.reason, f"{where}: {exc}") from None
    except MemoryError:
        raise reject("too_large", f"{where} is too large to decode") from None
    except Exception as exc:  # decoders raise odd types on hostile input; never a 500 for a bad file
        log.warning("decoder failure on %s: %r", where, exc)
        raise reject("corrupt", f"{where} could not be decoded ({type(exc).__name__})") from None
    check_xray(image, config, settings, where)
    return PreparedImage(image.pixels, image.source_format, image.original_size, data)


def display_pixels(image: PreparedImage, config: PreprocessConfig, settings: ServingSettings) -> np.ndarray:
    """The grayscale image to draw a heatmap on: as large as the heatmap, not just the model's size."""
    try:
        return decode(image.data, draft_size=max(config.image_size, settings.heatmap_max_side),
                      max_pixels=settings.max_image_pixels).pixels
    except Exception:  # decoded fine a moment ago; fall back to the model-size pixels
        return image.pixels
