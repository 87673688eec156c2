"""DICOM decoding: modality LUT, VOI LUT/window, MONOCHROME1 inversion, any bit depth -> uint8."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from model.preprocessing import InvalidImageError


def decode_dicom(data: bytes) -> np.ndarray:
    """Return the displayed image as uint8 (H, W), as a radiologist's viewer would show it."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidImageError("corrupt", f"the DICOM file could not be read: {exc}") from None
    if "PixelData" not in ds:
        raise InvalidImageError("no_pixel_data", "the DICOM file has no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported transfer syntaxes
        raise InvalidImageError("corrupt", f"the DICOM pixel data could not be decoded: {exc}") from None
    if raw.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        raw = raw[0]  # multi-frame: the first frame is the radiograph
    if raw.ndim != 2:
        raise InvalidImageError("not_grayscale", "colour DICOM images are not chest radiographs")
    windowed = ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds
    try:
        values = apply_modality_lut(raw, ds).astype(np.float64)
        if windowed:
            values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
            low, high = _voi_range(ds)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:  # LUTs pydicom cannot apply
        raise InvalidImageError("unsupported_dicom",
                                f"the DICOM grey-scale transform could not be applied: {exc}") from None
    if not windowed:
        # No window given: a robust min/max avoids a few hot pixels flattening the contrast.
        low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        scaled = np.zeros(values.shape, dtype=np.float64)
    else:
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: low values are white
    return np.round(scaled * 255.0).astype(np.uint8)


def _voi_range(ds) -> tuple[float, float]:
    """The VOI transform's output range, which the display maps to black..white (PS3.3 C.11.2).

    A VOI LUT outputs [0, 2^n - 1] with n from its descriptor, however little of it one image uses. A linear
    window outputs the stored range carried through the modality LUT (rescale slope and intercept), as
    pydicom's ``apply_windowing`` does: ignoring the rescale here squeezed a modality-unit window.
    """
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.get("BitsStored", 8))
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("PixelRepresentation", 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high
