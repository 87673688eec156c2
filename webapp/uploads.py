"""What an upload must be before anything is stored: a JPEG, PNG or DICOM radiograph, de-identified.

The patient's age (0010,1010) is read from a DICOM file first, before the profile removes it: the
model's intended use has an age limit, which the predictor applies. It travels beside the file (stored
encrypted, never logged), not in it.

DICOM files lose the identifying attributes of the DICOM PS3.15 basic application level
confidentiality profile (Kitware's ``dicom-anonymizer``, which encodes the standard's table E.1-1:
names, ids, birth date, addresses, institution, accession number, dates, UIDs replaced, private tags
removed, ...) unless the admin setting ``deidentify_dicom`` is off. Browsers cannot show DICOM, so a
PNG rendering (``model.dicom``, the decoder training uses) is stored beside it, and a 16-bit display copy
(the first frame's modality values at full resolution, gzip-compressed, with the file's own window) for the
viewer's window/level. The identifying fields the report needs (patient id, accession number, view, the
reason for the request) are read from the header *before* de-identification and handed on to be stored
encrypted; they never reach the stored file.

JPEG and PNG files lose their metadata (EXIF, XMP, IPTC, comments, text chunks: where cameras, PACS
exports and editing tools put names, dates and free text) unless ``strip_image_metadata`` is off. The
segments are dropped losslessly: the compressed pixels are stored byte for byte as uploaded.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass, field

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The DICOM standard whose table drives the de-identification (dicom-anonymizer's newest).
DEID_STANDARD = "dicomfields_2026c"
#: Longest side of the PNG rendering of a DICOM file shown in the browser.
PREVIEW_MAX_SIDE = 2048
#: Longest side of a worklist thumbnail.
THUMBNAIL_SIDE = 160

#: JPEG markers kept before the scan: APP0 (JFIF), APP2 (ICC colour profile), APP14 (Adobe colour
#: transform) and every non-APP, non-comment segment (tables, frame header, restart interval).
JPEG_KEPT_APP_MARKERS = {0xE0, 0xE2, 0xEE}
#: PNG chunks that carry free text, EXIF or a timestamp; everything else (pixels, palette, gamma,
#: colour profile) is kept.
PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}

_deid_lock = threading.Lock()  # dicom-anonymizer keeps a module-level UID map


class UploadRejected(ValueError):
    """An upload we refuse before storing it: ``code`` is a metric label, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class CheckedUpload:
    data: bytes  # what is stored and scored (de-identified for DICOM)
    image_format: str  # jpeg | png | dicom
    sha256: str
    preview_png: bytes | None = None
    deidentified: bool = False
    thumbnail_png: bytes | None = None
    display16_gz: bytes | None = None  # DICOM: uint16 little-endian rows, gzip
    display_meta: dict | None = None
    identity: dict = field(default_factory=dict)  # read from the DICOM header before de-identification
    patient_age_years: float | None = None  # DICOM Patient's Age, read before de-identification; never logged


def sniff(data: bytes, content_type: str = "", filename: str = "") -> str:
    if not data:
        raise UploadRejected("empty", "the file is empty")
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[128:132] == b"DICM" or content_type == "application/dicom" or filename.lower().endswith((".dcm",
                                                                                                      ".dicom")):
        return "dicom"
    raise UploadRejected("not_an_image", "the file is not a JPEG, PNG or DICOM image", 415)


#: Media types that claim nothing about the content (what a browser sends for a file it does not know).
UNDECLARED_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/x-binary"}
#: The media types that may declare each format.
DECLARED_TYPES = {"jpeg": {"image/jpeg", "image/jpg", "image/pjpeg"}, "png": {"image/png", "image/x-png"},
                  "dicom": {"application/dicom", "application/x-dicom", "image/dicom", "image/x-dicom"}}


def check_declared_type(content_type: str, image_format: str) -> None:
    """Refuse a file whose declared media type says something else than its content: a client that labels a
    DICOM file image/png is either broken or trying something, and the stored study must be what it says."""
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in UNDECLARED_TYPES or declared in DECLARED_TYPES[image_format]:
        return
    raise UploadRejected("type_mismatch", f"the file is declared as {declared[:60]} but its content is "
                                          f"{image_format.upper()}; send it with its own type", 415)


def check_upload(data: bytes, content_type: str = "", filename: str = "", deidentify: bool = True,
                 strip_metadata: bool = True) -> CheckedUpload:
    image_format = sniff(data, content_type, filename)
    check_declared_type(content_type, image_format)
    if image_format == "dicom":
        return _check_dicom(data, deidentify)
    _check_raster(data, image_format)
    if strip_metadata:
        data = strip_jpeg_metadata(data) if image_format == "jpeg" else strip_png_metadata(data)
    return CheckedUpload(data, image_format, hashlib.sha256(data).hexdigest(), deidentified=strip_metadata,
                         thumbnail_png=thumbnail(data))


def _unreadable_metadata(image_format: str) -> UploadRejected:
    return UploadRejected("unreadable", f"the {image_format.upper()} file's segments are malformed, so its "
                                        "metadata cannot be removed", 422)


def strip_jpeg_metadata(data: bytes) -> bytes:
    """The JPEG without APP1/APP3-13/APP15 segments (EXIF, XMP, IPTC, ...) and comments; the scan is untouched."""
    out = bytearray(data[:2])  # SOI
    position = 2
    while True:
        if position + 4 > len(data) or data[position] != 0xFF:
            raise _unreadable_metadata("jpeg")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # EOI before any scan
            raise _unreadable_metadata("jpeg")
        length = int.from_bytes(data[position + 2:position + 4], "big")
        end = position + 2 + length
        if length < 2 or end > len(data):
            raise _unreadable_metadata("jpeg")
        if marker == 0xDA:  # start of scan: entropy-coded data and everything after it are kept verbatim
            out += data[position:]
            return bytes(out)
        is_metadata = (0xE0 <= marker <= 0xEF and marker not in JPEG_KEPT_APP_MARKERS) or marker == 0xFE
        if not is_metadata:
            out += data[position:end]
        position = end


def strip_png_metadata(data: bytes) -> bytes:
    """The PNG without its text, EXIF and time chunks; the other chunks are copied with their CRCs."""
    out = bytearray(data[:8])
    position = 8
    while position < len(data):
        if position + 12 > len(data):
            raise _unreadable_metadata("png")
        length = int.from_bytes(data[position:position + 4], "big")
        chunk_type = data[position + 4:position + 8]
        end = position + 12 + length
        if end > len(data):
            raise _unreadable_metadata("png")
        if chunk_type not in PNG_METADATA_CHUNKS:
            out += data[position:end]
        position = end
        if chunk_type == b"IEND":
            return bytes(out)
    raise _unreadable_metadata("png")


def _check_raster(data: bytes, image_format: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image_format == "png":
                image.verify()  # CRCs of every chunk
    except Exception:  # Pillow raises many types for broken files
        raise UploadRejected("unreadable", f"the file starts like a {image_format.upper()} but cannot be read "
                                           "(truncated or corrupt)", 422) from None
    if min(width, height) < 1:
        raise UploadRejected("unreadable", "the image has no pixels", 422)


def _check_dicom(data: bytes, deidentify: bool) -> CheckedUpload:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        raise UploadRejected("unreadable", "the DICOM file cannot be read (truncated or corrupt)", 422) from None
    if "PixelData" not in dataset:
        raise UploadRejected("no_pixel_data", "the DICOM file has no pixel data (no image to score)", 422)
    identity = dicom_identity(dataset)
    age = _patient_age(dataset)  # before the profile removes it
    if deidentify:
        data = deidentify_dicom(dataset)
    preview = _dicom_preview(data)
    display16, meta = _dicom_display_copy(data)
    return CheckedUpload(data, "dicom", hashlib.sha256(data).hexdigest(), preview, deidentify,
                         thumbnail_png=thumbnail(preview), display16_gz=display16, display_meta=meta,
                         identity=identity, patient_age_years=age)


def dicom_identity(dataset) -> dict:
    """The report's identifying fields from a DICOM header (before de-identification); absent ones are left out.
    The clinical question is the request's reason (0040,1002), directly or in the Request Attributes Sequence."""
    from model.dicom import header_view
    from webapp.models import VIEWS

    def text(value) -> str:
        return " ".join(str(value or "").split())

    identity = {"patient_ref": text(dataset.get("PatientID")), "accession": text(dataset.get("AccessionNumber")),
                "view": header_view(dataset),
                "clinical_question": text(dataset.get("ReasonForTheRequestedProcedure"))}
    if not identity["clinical_question"]:
        for item in dataset.get("RequestAttributesSequence") or []:
            identity["clinical_question"] = text(item.get("ReasonForTheRequestedProcedure"))
            if identity["clinical_question"]:
                break
    if identity["view"] not in VIEWS:
        # a word the standard does not define claims nothing (as model.intended_use.view_reason); a lateral film's
        # term is kept, so the study names the view the serving stack refers it for
        identity["view"] = ""
    return {key: value for key, value in identity.items() if value}


def thumbnail(image_bytes: bytes) -> bytes | None:
    """A small PNG for the worklist (None when Pillow cannot read the file: the upload is refused later)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            if image.format == "JPEG":
                image.draft("L", (THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE * 2))  # DCT-domain reduction: fast
            gray = image.convert("L")
    except Exception:  # Pillow raises many types for broken files
        return None
    gray.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = io.BytesIO()
    gray.save(out, format="PNG")
    return out.getvalue()


def _patient_age(dataset) -> float | None:
    """Patient's Age in years, or None when absent or malformed (the value is never put in a message or log)."""
    from model.intended_use import InvalidAge, parse_age

    try:
        return parse_age(str(dataset.get("PatientAge", "") or ""))
    except (InvalidAge, TypeError, ValueError):
        return None


def deidentify_dicom(dataset) -> bytes:
    """Apply the PS3.15 basic profile to ``dataset`` and return the written file."""
    from dicomanonymizer import simpledicomanonymizer as deid

    with _deid_lock:
        try:
            deid.anonymize_dataset(dataset, delete_private_tags=True,
                                   base_rules_gen=lambda: deid.initialize_actions(DEID_STANDARD))
        except Exception:  # a malformed element the profile trips over
            raise UploadRejected("unreadable", "the DICOM file has malformed attributes and cannot be "
                                               "de-identified", 422) from None
        finally:
            deid.dictionary.clear()  # the old -> new UID map must not outlive this file
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = "DICOM PS3.15 basic application level confidentiality profile"
    if getattr(dataset, "file_meta", None) is not None and "SOPInstanceUID" in dataset:
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    out = io.BytesIO()
    try:
        dataset.save_as(out, enforce_file_format=False)
    except Exception:
        raise UploadRejected("unreadable", "the de-identified DICOM file cannot be written", 422) from None
    return out.getvalue()


def _dicom_display_copy(data: bytes) -> tuple[bytes, dict]:
    import gzip

    from model.dicom import display_copy
    from model.errors import InvalidImageError
    from model.preprocessing import DEFAULT_MAX_PIXELS

    try:
        stored, meta = display_copy(data, DEFAULT_MAX_PIXELS)
    except InvalidImageError as exc:
        raise UploadRejected(exc.reason, str(exc), 422) from None
    # level 1: half the time of level 4 for 7 % more bytes (a 1,500 px film: 1.5 MB, ~0.1 s on the dev machine)
    return gzip.compress(stored.astype("<u2").tobytes(), compresslevel=1), meta


def _dicom_preview(data: bytes) -> bytes:
    from PIL import Image

    from model.dicom import decode_dicom
    from model.errors import InvalidImageError
    from model.preprocessing import DEFAULT_MAX_PIXELS

    try:
        gray = decode_dicom(data, DEFAULT_MAX_PIXELS)  # the decoder's cost bounds (pixels, bytes, first frame)
    except InvalidImageError as exc:
        raise UploadRejected(exc.reason, str(exc), 422) from None
    image = Image.fromarray(gray)
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return out.getvalue()
