"""Every decoder's cost is bounded before the expensive work: crafted bombs are refused with a 4xx reason,
and the decoding process's peak memory stays under a stated bound.

Peak memory is measured in a fresh interpreter per file: the kernel's peak-RSS mark (``VmHWM``) is reset
after the imports (``/proc/self/clear_refs``), so the peak read after the decode attempt is the decode's.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

MIB = 1024 * 1024

_MEASURE = """
import json, sys
import numpy, PIL.Image, pydicom, pydicom.pixels, model.dicom
from model.errors import InvalidImageError
from model.preprocessing import decode

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
kwargs = json.loads(sys.argv[2])
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak-RSS mark to the current RSS
base = kib("VmRSS:")
try:
    image = decode(data, **kwargs)
    reason, shape = None, list(image.pixels.shape)
except InvalidImageError as exc:
    reason, shape = exc.reason, None
print(json.dumps({"reason": reason, "shape": shape, "growth_mib": (kib("VmHWM:") - base) / 1024}))
"""


def measure(tmp_path, data: bytes, **kwargs) -> dict:
    path = tmp_path / "crafted.bin"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _meta(syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = syntax
    return meta


def _image_attributes(ds: Dataset, rows: int, columns: int, bits: int, frames: int = 1) -> None:
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames


def _rle_zero_segment(length: int) -> bytes:
    """PackBits runs of 128 zero bytes: 2 bytes of file per 128 bytes of image."""
    runs, rest = divmod(length, 128)
    out = b"\x81\x00" * runs
    if rest:
        out += bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00"
    return out + (b"\x00" if len(out) % 2 else b"")


def _rle_frame(segment_lengths: list[int]) -> bytes:
    segments = [_rle_zero_segment(n) for n in segment_lengths]
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    header = np.zeros(16, dtype="<u4")
    header[0] = len(segments)
    header[1:1 + len(segments)] = offsets
    return header.tobytes() + b"".join(segments)


def rle_dicom(rows: int, columns: int, bits: int, frames: int = 1, segment_length: int | None = None) -> bytes:
    from pydicom.encaps import encapsulate

    ds = FileDataset("x.dcm", {}, file_meta=_meta(uid.RLELossless), preamble=b"\0" * 128)
    _image_attributes(ds, rows, columns, bits, frames)
    planes = bits // 8
    frame = _rle_frame([segment_length or rows * columns] * planes)
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deflate_bomb(inflated_mib: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to ``inflated_mib`` MiB."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, _meta(uid.DeflatedExplicitVRLittleEndian))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    ds = Dataset()
    _image_attributes(ds, 8192, 8192, 16)
    write_dataset(body, ds)
    length = inflated_mib * MIB
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(body.getvalue() + pixel_header)]
    zeros = bytes(MIB)
    parts += [deflate.compress(zeros) for _ in range(inflated_mib)]
    parts.append(deflate.flush())
    return head.getvalue() + b"".join(parts)


def png_bomb(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def test_deflate_dicom_is_refused_before_it_inflates(tmp_path):
    data = deflate_bomb(200)
    assert len(data) < 400 * 1024  # a 200 MiB data set in a small file
    result = measure(tmp_path, data)
    assert result["reason"] == "unsupported_format" and result["growth_mib"] < 16, result


def test_rle_dicom_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    data = rle_dicom(4096, 4096, 16)  # 32 MiB of pixels in about 513 KiB
    assert len(data) < 600 * 1024
    result = measure(tmp_path, data, max_pixels=1_000_000)
    assert result["reason"] == "too_large" and result["growth_mib"] < 16, result


def test_rle_segments_that_expand_past_the_declared_size_are_refused(tmp_path):
    data = rle_dicom(256, 256, 16, segment_length=4096 * 4096)  # declares 256x256, inflates to 16 MiB per plane
    result = measure(tmp_path, data)
    assert result["reason"] == "too_large" and result["growth_mib"] < 16, result


def test_only_the_first_frame_of_a_multi_frame_dicom_is_decoded(tmp_path):
    data = rle_dicom(1024, 1024, 16, frames=64)  # 128 MiB if every frame were decoded
    result = measure(tmp_path, data)
    assert result["reason"] is None and result["shape"] == [512, 512]
    assert result["growth_mib"] < 64, result
    too_many = rle_dicom(1024, 1024, 16, frames=200)  # 400 MiB declared: over the default 256 MiB bound
    result = measure(tmp_path, too_many)
    assert result["reason"] == "too_large" and result["growth_mib"] < 32, result


@pytest.mark.parametrize("side", [6320, 30000])
def test_raster_pixel_count_is_checked_from_the_header(tmp_path, side):
    data = png_bomb(side) if side < 10000 else _jpeg_header_claiming(side)
    result = measure(tmp_path, data, max_pixels=20_000_000)
    assert result["reason"] == "too_large" and result["growth_mib"] < 16, result


def _jpeg_header_claiming(side: int) -> bytes:
    """A small JPEG whose frame header is patched to declare side x side pixels."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def test_large_real_sized_rasters_decode_to_the_bounded_size(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 3000, dtype=np.uint8), (2400, 1))
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=90)
    result = measure(tmp_path, buffer.getvalue())
    assert result["reason"] is None and result["shape"] == [300, 375]  # drafted to 1/8: aspect ratio kept
    assert result["growth_mib"] < 24, result  # no full-size bitmap (7 Mpx) is ever made


def test_the_transformer_caps_pixels_per_request_before_decoding():
    from serving.errors import RequestRejected
    from serving.settings import ServingSettings
    from serving.transformer import PneumoniaTransformer

    import base64

    side = 4000  # 16 Mpx each: under the per-image limit, 64 Mpx together: over the per-request one
    png = base64.b64encode(png_bomb(side)).decode()
    transformer = PneumoniaTransformer("pneumonia", "127.0.0.1:1", settings=ServingSettings())
    transformer.load()
    with pytest.raises(RequestRejected) as info:
        asyncio.run(transformer.preprocess({"instances": [{"image": {"b64": png}}] * 4}))
    assert info.value.code == "too_large" and info.value.status == 413 and "together" in str(info.value)
