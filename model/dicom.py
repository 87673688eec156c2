"""DICOM decoding: modality LUT, VOI LUT/window, MONOCHROME1 inversion, any bit depth -> uint8.

The cost is bounded before pixel data is touched:

- the transfer syntax must be on an allowlist, read from the file meta alone (a Deflate file would
  otherwise be inflated whole by ``dcmread``);
- Rows x Columns must fit ``max_pixels`` and Rows x Columns x frames x samples x bytes must fit
  ``max_bytes``;
- a compressed frame must declare the size the dataset declares (JPEG, JPEG 2000) or decompress to
  no more than it (RLE, checked by walking the run headers without producing output);
- only the first frame, the radiograph, is decoded.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pydicom
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from model.errors import InvalidImageError

#: Transfer syntaxes decoded here (native, RLE, and the JPEG flavours Pillow decodes). Deflate is
#: absent: ``dcmread`` inflates the whole data set before anything can be checked.
NATIVE_SYNTAXES = frozenset({uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian})
JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEG2000Lossless, uid.JPEG2000})
ALLOWED_SYNTAXES = NATIVE_SYNTAXES | JPEG_SYNTAXES | {uid.RLELossless}
#: Default bound on Rows x Columns x frames x samples x bytes per sample (what a full decode would allocate).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def decode_dicom(data: bytes, max_pixels: int, max_bytes: int | None = None) -> np.ndarray:
    """Return the displayed first frame as uint8 (H, W), as a radiologist's viewer would show it."""
    ds = _read_checked(data, max_pixels, max_bytes or DEFAULT_MAX_BYTES)
    try:
        ds.pixel_array_options(index=0)  # only the first frame: a multi-frame radiograph is its first
        raw = ds.pixel_array
    except InvalidImageError:
        raise
    except Exception as exc:  # pydicom raises many types for corrupt or unsupported pixel data
        raise InvalidImageError("corrupt", f"the DICOM pixel data could not be decoded: {exc}") from None
    if raw.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise InvalidImageError("not_grayscale", "colour DICOM images are not chest radiographs")
    windowed = ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds
    try:
        values = apply_modality_lut(raw, ds).astype(np.float64)
        if windowed:
            values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
            low, high = _voi_range(ds)
    # LUTs pydicom cannot apply (or descriptors too large to compute a range from)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise InvalidImageError("unsupported_dicom",
                                f"the DICOM grey-scale transform could not be applied: {exc}") from None
    if not windowed:
        # No window given: a robust min/max avoids a few hot pixels flattening the contrast.
        low, high = np.percentile(values, [0.5, 99.5])
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        scaled = np.zeros(values.shape, dtype=np.float64)
    else:
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: low values are white
    return np.round(np.nan_to_num(scaled) * 255.0).astype(np.uint8)


def _read_checked(data: bytes, max_pixels: int, max_bytes: int):
    syntax = transfer_syntax(data)
    if syntax not in ALLOWED_SYNTAXES:
        name = getattr(uid.UID(syntax), "name", syntax) if syntax else "none"
        raise InvalidImageError("unsupported_format", f"DICOM transfer syntax {name} ({syntax}) is not accepted; "
                                                      "send uncompressed, RLE, JPEG or JPEG 2000 DICOM")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, IndexError, TypeError, OverflowError) as exc:
        raise InvalidImageError("corrupt", f"the DICOM file could not be read: {exc}") from None
    if "PixelData" not in ds:
        raise InvalidImageError("no_pixel_data", "the DICOM file has no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidImageError("corrupt", f"the DICOM image description is incomplete: {exc}") from None
    if min(rows, columns, frames, samples, bits) < 1:
        raise InvalidImageError("corrupt", f"the DICOM file declares {rows}x{columns} pixels, {frames} frames, "
                                           f"{samples} samples of {bits} bits")
    if rows * columns > max_pixels:
        raise InvalidImageError("too_large", f"the DICOM image is {columns}x{rows}; at most {max_pixels} pixels are "
                                             "accepted")
    declared = rows * columns * frames * samples * ((bits + 7) // 8)
    if declared > max_bytes:
        raise InvalidImageError("too_large", f"the DICOM pixel data would decode to {declared} bytes ({frames} "
                                             f"frames); at most {max_bytes} are accepted")
    if syntax not in NATIVE_SYNTAXES:
        _check_first_frame(ds, syntax, rows, columns, samples * ((bits + 7) // 8), frames)
    return ds


def header_facts(data: bytes) -> tuple[float | None, str]:
    """(Patient's Age (0010,1010) in years, the film's view as :func:`header_view` reads it) from the header alone,
    one read; None / "" where absent or malformed.

    Read before anything else touches the file (a de-identified copy no longer has the age). Never logged."""
    from model.intended_use import InvalidAge, parse_age

    try:
        if transfer_syntax(data) not in ALLOWED_SYNTAXES:
            return None, ""  # the decoder refuses the file with its own message
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True,
                             specific_tags=["PatientAge", "ViewPosition", "ViewCodeSequence"])
    except (InvalidImageError, InvalidDicomError, OSError, ValueError, EOFError, KeyError, IndexError, TypeError):
        return None, ""
    try:
        age = parse_age(str(ds.get("PatientAge", "") or ""))
    except (InvalidAge, ValueError, TypeError):
        age = None
    return age, header_view(ds)


#: View Position terms of the coded views (DICOM CID 4010 "DX View") a chest film may carry; the other concepts of
#: the group (axial, tangential, cranio-caudal, ...) claim nothing, as an unknown View Position word does.
CODED_VIEW_TERMS = {"PosteroAnterior": "PA", "AnteroPosterior": "AP", "LeftLateral": "LL", "RightLateral": "RL",
                    "LateralProjection": "LATERAL", "LateralMedial": "LATERAL", "MedioLateralProjection": "LATERAL"}


@functools.cache
def _coded_views() -> tuple:
    """(pydicom Code, View Position term) for CID 4010's frontal, lateral and oblique concepts."""
    from pydicom.sr.codedict import Collection

    views = Collection("CID4010")
    return (*((getattr(views, name), term) for name, term in CODED_VIEW_TERMS.items()),
            *((getattr(views, name), "OBLIQUE") for name in views.dir() if "Oblique" in name))


def header_view(ds) -> str:
    """The film's view from a header: View Position (0018,5101) when it is one of the standard's terms; otherwise the
    first item of View Code Sequence (0054,0220), which modalities write beside or instead of it (SNOMED CT, or the
    older SNOMED-RT codes, which pydicom's ``Code`` maps), as a View Position term; otherwise View Position as written
    (empty, or a word that claims nothing)."""
    from pydicom.sr.coding import Code

    from model.intended_use import FRONTAL_VIEWS, NON_FRONTAL_VIEWS, view_position

    written = view_position(ds.get("ViewPosition"))
    if written in FRONTAL_VIEWS or written in NON_FRONTAL_VIEWS:
        return written
    try:
        item = (ds.get("ViewCodeSequence") or [None])[0]
        if item is None:
            return written
        code = Code(str(item.CodeValue).strip(), str(item.CodingSchemeDesignator).strip(),
                    str(item.get("CodeMeaning", "") or "-"))
        return next((term for concept, term in _coded_views() if code == concept), written)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return written  # a malformed item claims nothing


def declared_pixels(data: bytes) -> int:
    """Rows x Columns of the first frame, read from the header alone (0 when not allowed or unreadable)."""
    if transfer_syntax(data) not in ALLOWED_SYNTAXES:
        return 0
    ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)


def transfer_syntax(data: bytes) -> str | None:
    """The file meta's transfer syntax, read without touching the data set."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # public read_file_meta_info wants a path

    try:
        fp = io.BytesIO(data)
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception as exc:  # a malformed meta group: the file is not readable DICOM
        raise InvalidImageError("corrupt", f"the DICOM file meta could not be read: {exc}") from None
    syntax = meta.get("TransferSyntaxUID")
    return str(syntax) if syntax else None


def _check_first_frame(ds, syntax: str, rows: int, columns: int, planes: int, frames: int) -> None:
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as exc:
        raise InvalidImageError("corrupt", f"the DICOM pixel data is not valid encapsulated data: {exc}") from None
    if syntax == uid.RLELossless:
        _check_rle(frame, rows * columns, planes)
        return
    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(frame)).size  # the codestream header only
    except Exception as exc:
        raise InvalidImageError("corrupt", f"the DICOM JPEG frame could not be read: {exc}") from None
    if (width, height) != (columns, rows):
        raise InvalidImageError("corrupt", f"the DICOM JPEG frame is {width}x{height} but the file declares "
                                           f"{columns}x{rows}")


def _check_rle(frame: bytes, segment_length: int, planes: int) -> None:
    """Every RLE segment must decompress to at most Rows x Columns bytes (PackBits can expand 64-fold)."""
    if len(frame) < 64:
        raise InvalidImageError("corrupt", "the DICOM RLE frame has no header")
    header = np.frombuffer(frame[:64], dtype="<u4")
    count = int(header[0])
    if count != planes or count > 15:
        raise InvalidImageError("corrupt", f"the DICOM RLE frame has {count} segments; {planes} expected")
    offsets = [int(o) for o in header[1:1 + count]] + [len(frame)]
    for start, stop in zip(offsets, offsets[1:]):
        if not 64 <= start <= stop <= len(frame):
            raise InvalidImageError("corrupt", "the DICOM RLE segment offsets are out of order")
        if _packbits_length(frame, start, stop, segment_length) > segment_length:
            raise InvalidImageError("too_large", "a DICOM RLE segment decompresses to more than the image it "
                                                 "declares")


def _packbits_length(data: bytes, pos: int, stop: int, limit: int) -> int:
    """Decoded length of one PackBits segment, stopping as soon as it exceeds ``limit``."""
    length = 0
    while pos < stop and length <= limit:
        header = data[pos]
        if header < 128:  # literal run of header + 1 bytes
            length += header + 1
            pos += header + 2
        elif header > 128:  # the next byte repeated 257 - header times
            length += 257 - header
            pos += 2
        else:  # 128: no operation
            pos += 1
    return length


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


def display_copy(data: bytes, max_pixels: int, max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """The first frame at full resolution and full bit depth, for a viewer's window/level: uint16 (H, W) of
    modality values shifted (and, past 16 bits, scaled) into 0..65535, and how to read it.

    ``meta``: ``width``, ``height``, ``offset`` and ``scale`` (modality value = stored * scale + offset), ``min``
    and ``max`` of the stored values, ``window_center`` / ``window_width`` in stored units (the file's own
    window, or for a VOI LUT the range of its input, or the 0.5-99.5 % range of the pixels when it has neither),
    ``window_source`` (``window``, ``voi_lut`` or ``pixels``) and ``invert`` (MONOCHROME1: low values are white).
    """
    ds = _read_checked(data, max_pixels, max_bytes or DEFAULT_MAX_BYTES)
    try:
        ds.pixel_array_options(index=0)
        raw = ds.pixel_array
        if raw.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
            raw = raw[0]
        if raw.ndim != 2:
            raise InvalidImageError("not_grayscale", "colour DICOM images are not chest radiographs")
        values = apply_modality_lut(raw, ds).astype(np.float64)
    except InvalidImageError:
        raise
    except Exception as exc:  # pydicom raises many types for corrupt or unsupported pixel data
        raise InvalidImageError("corrupt", f"the DICOM pixel data could not be decoded: {exc}") from None
    low, high = float(np.min(values)), float(np.max(values))
    scale = max(1.0, (high - low) / 65535.0) if np.isfinite(high - low) else 1.0
    stored = np.round((np.nan_to_num(values) - low) / scale).clip(0, 65535).astype(np.uint16)

    def to_stored(value: float) -> float:
        return (value - low) / scale

    center = width = None
    source = "pixels"
    try:
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
            center, width, source = to_stored(center), width / scale, "window"
        elif "VOILUTSequence" in ds:
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            entries, first_input = int(descriptor[0]) or 65536, float(descriptor[1])
            center, width, source = to_stored(first_input + entries / 2), entries / scale, "voi_lut"
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        center = width = None
    if center is None or not width or width <= 0 or not np.isfinite(center):
        p_low, p_high = np.percentile(stored, [0.5, 99.5])
        center, width, source = (p_low + p_high) / 2, max(1.0, float(p_high - p_low)), "pixels"
    height_px, width_px = stored.shape
    meta = {"width": int(width_px), "height": int(height_px), "offset": low, "scale": scale,
            "min": int(stored.min()), "max": int(stored.max()), "window_center": round(float(center), 3),
            "window_width": round(float(width), 3), "window_source": source,
            "invert": str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1",
            "bits_stored": int(ds.get("BitsStored", 16) or 16)}
    return stored, meta


def _first_value(value) -> float:
    """The first of a multi-valued attribute (Window Center/Width may list several windows)."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)
