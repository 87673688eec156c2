"""The transformer's half of preprocessing: encoded upload -> bounded grayscale, and the X-ray gate.

Decoding is stage 1 of ``model.preprocessing`` (the code path training used), with its cost bounded
before the expensive work (header pixel counts, the DICOM transfer-syntax allowlist, one frame).
The gate refuses colour pictures, near-uniform frames and images whose mean intensity no radiograph
has. Its bounds are absolute, not a model version's statistics, so that the transformer needs no
model version (see docs/design.md, "The serving boundary"). Set on every real X-ray in ``shared/data`` (5,432 files):
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

from model.dicom import header_facts
from model.errors import InvalidImageError
from model.preprocessing import DecodedImage, decode, is_dicom
from serving.errors import RequestRejected
from serving.metrics import reject_count
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF")
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_STATUS = {"too_large": 413, "too_many_images": 413, "not_grayscale": 422, "out_of_distribution": 422,
           "low_contrast": 422, "unsupported_format": 415}


def reject(code: str, message: str, status: int | None = None) -> RequestRejected:
    """Count the rejection (once, here) and build the error to raise."""
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
    pixels: np.ndarray  # uint8 (h, w), at most DECODED_MAX_SIDE per side: sent to the predictor, drawn on
    source_format: str
    original_size: tuple[int, int]
    age_years: float | None = None  # DICOM Patient's Age, read before anything else; never logged
    view_position: str = ""  # the DICOM header's view as a View Position term (PA, AP, LL, ...), "" if it names none


def check_xray(image: DecodedImage, settings: ServingSettings, where: str) -> None:
    """Refuse colour pictures, blank frames and intensities no radiograph has."""
    if image.colourfulness > settings.max_colourfulness:
        raise reject("not_grayscale", f"{where} is a colour picture (colourfulness {image.colourfulness:.1f} > "
                                      f"{settings.max_colourfulness}); send a grayscale chest X-ray")
    pixels = image.pixels
    contrast = float(pixels.std())
    if contrast < settings.min_contrast:
        raise reject("low_contrast", f"{where} is nearly uniform (pixel sd {contrast:.1f} < {settings.min_contrast}); "
                                     "not a radiograph")
    mean = float(pixels.mean())
    if not settings.min_mean_intensity <= mean <= settings.max_mean_intensity:
        side = "dark" if mean < settings.min_mean_intensity else "bright"
        raise reject("out_of_distribution", f"{where} is too {side} for a chest X-ray (mean intensity {mean:.0f}/255, "
                                            f"accepted {settings.min_mean_intensity:.0f}-"
                                            f"{settings.max_mean_intensity:.0f})")


def decode_upload(data: bytes, settings: ServingSettings, where: str = "the image") -> PreparedImage:
    """Encoded JPEG/PNG/DICOM -> bounded grayscale through stage 1 of the training code path, then the gate."""
    if len(data) > settings.max_payload_bytes:
        raise reject("too_large", f"{where} is {len(data)} bytes; at most {settings.max_payload_bytes} are accepted")
    age, view = header_facts(data) if is_dicom(data) else (None, "")
    try:
        image = decode(data, max_pixels=settings.max_image_pixels, max_dicom_bytes=settings.max_dicom_bytes)
    except InvalidImageError as exc:
        raise reject(exc.reason, f"{where}: {exc}") from None
    except MemoryError:
        raise reject("too_large", f"{where} is too large to decode") from None
    except Exception as exc:  # decoders raise odd types on hostile input; never a 500 for a bad file
        log.info("decoder failure on %s: %s", where, type(exc).__name__)
        raise reject("corrupt", f"{where} could not be decoded ({type(exc).__name__})") from None
    check_xray(image, settings, where)
    return PreparedImage(image.pixels, image.source_format, image.original_size, age, view)
