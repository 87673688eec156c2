"""Claims of the preprocessing: DICOM display pipeline (exact pixels), colour input, augmentation.

DICOM references are computed here from the standard (PS3.3 C.11.1 modality LUT, C.11.2.1.2.1 linear
window, C.11.2.1.1 VOI LUT sequence) rather than by calling pydicom, and every case compares exact 8-bit
pixel values.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from claims_fixtures import png
from model.data import SplitFractions, prepare
from model.preprocessing import PreprocessConfig, decode, load_resized
from model.transforms import EvalTransform, TrainTransform
from numerics import U32, normalize_bound


def dicom(frames: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", window=None, rescale=None,
          voi_lut: tuple[list[int], np.ndarray] | None = None, modality_lut: tuple[list[int], np.ndarray] | None = None,
          slope_only: float | None = None) -> bytes:
    """A DX file holding ``frames`` ([rows, cols] or [n, rows, cols]; int16 frames are stored signed)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "ANON"
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if frames.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if frames.dtype == np.int16 else 0
    ds.PixelData = frames.tobytes()
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if slope_only is not None:
        ds.RescaleSlope = slope_only  # without an intercept: not a modality rescale (both are required)
    if modality_lut:
        descriptor, data = modality_lut
        item = Dataset()
        item.LUTDescriptor = descriptor
        item.ModalityLUTType = "US"
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())  # LUTData
        ds.ModalityLUTSequence = Sequence([item])
    if voi_lut:
        descriptor, data = voi_lut
        item = Dataset()
        item.LUTDescriptor = descriptor
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())  # LUTData
        ds.VOILUTSequence = Sequence([item])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 to [0, 1]."""
    c, w = center - 0.5, width - 1.0
    y = (values - c) / w + 0.5
    y = np.where(values <= c - w / 2, 0.0, y)
    return np.where(values > c + w / 2, 1.0, y)


def to_8bit(unit: np.ndarray) -> np.ndarray:
    scaled = np.clip(unit, 0, 1) * 255.0
    # the test data keep clear of rounding ties, so any correct implementation gives exactly these bytes (the
    # product and pydicom window in float64: a few roundings of u = 1.1e-16 on values below 2^16 move `scaled`
    # by less than 1e-9, a thousandth of TIE_MARGIN)
    assert np.all(np.abs(scaled - np.floor(scaled) - 0.5) > TIE_MARGIN), "test values sit on a rounding tie"
    return np.round(scaled).astype(np.uint8)


TIE_MARGIN = 1e-6


def _tie(unit: np.ndarray) -> np.ndarray:
    scaled = np.clip(unit, 0, 1) * 255.0
    return np.abs(scaled - np.floor(scaled) - 0.5) <= TIE_MARGIN


def ramp_12bit(rows: int = 64, cols: int = 96, top: int = 4095, displays=()) -> np.ndarray:
    """Every stored value 3..top in order (repeated to fill the frame), minus those that any of ``displays``
    (stored value -> [0, 1]) puts on a rounding tie."""
    values = np.arange(3, top + 1, dtype=np.float64)
    for display in displays:
        values = values[~_tie(display(values))]
    picks = np.linspace(0, len(values) - 1, rows * cols).round().astype(int)
    return values[picks].astype(np.uint16).reshape(rows, cols)


def test_modality_lut_moves_a_window_given_in_modality_units():
    slope, intercept, center, width = 2.0, -1000.0, 1500.0, 2001.0
    stored = ramp_12bit(displays=[lambda v: linear_window(v * slope + intercept, center, width),
                                  lambda v: linear_window(v, center, width)])
    expected = to_8bit(linear_window(stored * slope + intercept, center, width))
    with_lut = decode(dicom(stored, 12, window=(center, width), rescale=(slope, intercept))).pixels
    assert np.array_equal(with_lut, expected)
    without = decode(dicom(stored, 12, window=(center, width))).pixels
    assert np.array_equal(without, to_8bit(linear_window(stored.astype(float), center, width)))
    assert not np.array_equal(with_lut, without), "the rescale must change what a modality-unit window shows"


def test_signed_data_window_with_rescale_exact():
    stored = (ramp_12bit(displays=[lambda v: linear_window((v - 2048) * 0.5 + 100, 0.0, 1201.0),
                                   lambda v: linear_window(v - 2048, 0.0, 1201.0)]).astype(np.int32) - 2048)
    stored = stored.astype(np.int16)
    shown = decode(dicom(stored, 12, window=(0.0, 1201.0), rescale=(0.5, 100.0))).pixels
    assert np.array_equal(shown, to_8bit(linear_window(stored * 0.5 + 100, 0.0, 1201.0)))
    plain = decode(dicom(stored, 12, window=(0.0, 1201.0))).pixels
    assert np.array_equal(plain, to_8bit(linear_window(stored.astype(float), 0.0, 1201.0)))


def test_modality_lut_sequence_then_window_exact():
    lut = np.round(np.linspace(0, 1023, 4096)).astype(np.uint16)  # 12-bit stored -> 0..1023 values
    stored = ramp_12bit(displays=[lambda v: linear_window(lut[v.astype(int)].astype(float), 400.0, 301.0)])
    shown = decode(dicom(stored, 12, window=(400.0, 301.0), modality_lut=([4096, 0, 16], lut))).pixels
    assert np.array_equal(shown, to_8bit(linear_window(lut[stored].astype(float), 400.0, 301.0)))
    without = decode(dicom(stored, 12, window=(400.0, 301.0))).pixels
    assert not np.array_equal(shown, without)


def test_a_lut_pydicom_cannot_apply_is_a_clear_error_not_a_crash():
    from model.errors import InvalidImageError

    lut = np.arange(4096).astype(np.uint16) // 4
    with pytest.raises(InvalidImageError) as err:  # a 10-bit LUT: pydicom only handles 8/16-bit LUT data
        decode(dicom(ramp_12bit(), 12, window=(400.0, 301.0), modality_lut=([4096, 0, 10], lut)))
    assert err.value.reason == "unsupported_dicom"


def test_a_rescale_slope_without_intercept_is_ignored():
    stored = ramp_12bit(displays=[lambda v: linear_window(v, 1024.0, 1501.0)])
    shown = decode(dicom(stored, 12, window=(1024.0, 1501.0), slope_only=3.0)).pixels
    assert np.array_equal(shown, to_8bit(linear_window(stored.astype(float), 1024.0, 1501.0)))


def test_an_unreadable_dicom_is_reported_as_corrupt():
    from model.errors import InvalidImageError

    good = dicom(ramp_12bit(), 12)
    with pytest.raises(InvalidImageError) as err:
        decode(good[:len(good) // 2])  # truncated in the pixel data
    assert err.value.reason == "corrupt" and "could not be decoded" in str(err.value)


def test_voi_lut_sequence_is_applied_at_the_luts_output_depth():
    # a gamma-like LUT over 12-bit input, 12-bit output; the image uses only the lower half of the input range
    lut = np.round(4095 * np.sqrt(np.arange(4096) / 4095) ** 1.0).astype(np.uint16)
    stored = ramp_12bit(top=2047, displays=[lambda v: lut[v.astype(int)] / 4095.0])
    expected = to_8bit(lut[stored] / 4095.0)
    shown = decode(dicom(stored, 12, voi_lut=([4096, 0, 12], lut))).pixels
    assert np.array_equal(shown, expected)


def test_voi_lut_sequence_wins_over_a_window():
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting LUT
    stored = ramp_12bit(displays=[lambda v: lut[v.astype(int)] / 4095.0])
    shown = decode(dicom(stored, 12, window=(2048, 4096), voi_lut=([4096, 0, 12], lut))).pixels
    assert np.array_equal(shown, to_8bit(lut[stored] / 4095.0))


def test_multi_frame_shows_the_first_frame_exactly():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 80, 72), dtype=np.uint8)
    shown = decode(dicom(frames, 8, window=(128, 256))).pixels  # an identity window for 8-bit data
    assert shown.shape == (80, 72)
    assert np.array_equal(shown, to_8bit(linear_window(frames[0].astype(float), 128, 256)))
    assert np.array_equal(shown, frames[0])  # identity window: the stored bytes themselves


def test_monochrome1_is_inverted_exactly():
    pixels = np.random.default_rng(1).integers(0, 256, (70, 90), dtype=np.uint8)
    shown = decode(dicom(pixels, 8, "MONOCHROME1", window=(128, 256))).pixels
    assert np.array_equal(shown, 255 - pixels)


def test_twelve_bit_window_exact():
    stored = ramp_12bit(displays=[lambda v: linear_window(v, 1024, 513)])
    shown = decode(dicom(stored, 12, window=(1024, 513))).pixels
    assert np.array_equal(shown, to_8bit(linear_window(stored.astype(float), 1024, 513)))


# ---------------------------------------------------------------------------------------------------
# colour input

def bt601_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the reference colour-to-gray conversion."""
    return np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)


def test_rgb_input_gives_the_cache_the_reference_gray(tmp_path):
    rng = np.random.default_rng(2)
    colour = {}
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        folder = tmp_path / "data" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(6):
            rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            name = f"IM-{label}{i:03d}-0001.png" if label == 0 else f"person{i}_virus_1.png"
            (folder / name).write_bytes(png(rgb))
            colour[f"train/{cls}/{name}"] = rgb
    prepare(str(tmp_path / "data"), tmp_path / "cache", 64, SplitFractions(0.3, 0.0, 0), workers=1)
    images = np.load(tmp_path / "cache" / "images.npy")
    with (tmp_path / "cache" / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    for row in rows:
        cached = images[int(row["index"])].astype(int)
        reference = bt601_gray(colour[row["file"]].astype(float))
        diff = np.abs(cached - reference)
        # Pillow's fixed-point luma may round a tie the other way: never more than one level, rarely
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, row["file"]
        assert not np.array_equal(cached, colour[row["file"]][..., 1]), "a single channel is not a gray conversion"


# ---------------------------------------------------------------------------------------------------
# augmentation

def _xray() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    body = 150 - 60 * ((xx - 32) ** 2 + (yy - 34) ** 2) / 32**2
    return np.clip(body + np.random.default_rng(3).normal(0, 8, (64, 64)), 0, 255).astype(np.uint8)


def test_augmentation_differs_from_the_eval_transform_and_stays_within_bounds():
    config = PreprocessConfig(image_size=64, mean=0.45, std=0.22)
    pixels = _xray()
    evaluated = EvalTransform(config)(pixels)
    train = TrainTransform(config)
    draws = np.stack([train(pixels) for _ in range(200)])
    assert draws.shape == (200, 1, 64, 64) and draws.dtype == np.float32
    rounding = normalize_bound(255, config.mean, config.std)  # one float32 normalisation's worst error, twice
    changed = sum(not np.allclose(d, evaluated, rtol=0, atol=2 * rounding) for d in draws)
    assert changed >= 180, f"only {changed} of 200 augmented draws differ from the eval transform"
    assert len({d.tobytes() for d in draws}) >= 180, "augmentation repeats itself"
    # back to 0-255: intensities stay in the valid range, centred on the original exposure, and the
    # exposure/contrast changes have the documented size (brightness +-25 %, contrast +-25 %, gamma 0.7-1.3)
    as_pixels = draws * (255 * config.std) + 255 * config.mean
    # the way back rounds too: float32 products and sums of magnitude up to about 255 * 2 (a few u each)
    slack = 8 * U32 * 255
    assert as_pixels.min() >= -slack and as_pixels.max() <= 255 + slack
    means = as_pixels.mean(axis=(1, 2, 3))
    # The exposure steps are symmetric; the geometry's black fill (Affine, p=0.8: zoom-out, shift, rotation)
    # darkens this phantom's frame by about 6 %, within the 8 % allowed. `means.mean()` is itself a 200-draw
    # sample (sd of one draw's mean about 35 grey levels), so the bound adds 4 standard errors of that mean:
    # without them 4 of 25 unseeded trial runs failed on sampling noise alone.
    standard_error = means.std(ddof=1) / np.sqrt(len(means))
    shift = abs(means.mean() - pixels.mean())
    assert shift < 0.08 * pixels.mean() + 4 * standard_error, f"augmentation shifts the average exposure by {shift:.1f}"
    assert 15 < means.std() < 50, f"exposure varies by {means.std():.1f} grey levels (sd) between draws"
    contrast = as_pixels.std(axis=(1, 2, 3)) / pixels.std()
    assert np.percentile(contrast, 2) > 0.5 and np.percentile(contrast, 98) < 2.6, np.percentile(contrast, [2, 98])
    assert np.array_equal(EvalTransform(config)(pixels), evaluated), "the eval transform is deterministic"


def test_eval_transform_is_the_serving_normalisation():
    config = PreprocessConfig(image_size=64, mean=0.45, std=0.22)
    pixels = _xray()
    expected = ((pixels / 255.0 - 0.45) / 0.22)[None]
    assert (np.abs(EvalTransform(config)(pixels) - expected) <= normalize_bound(pixels, 0.45, 0.22)[None]).all()


def test_colour_rgb_of_gray_decodes_identically():
    gray = _xray()
    assert np.array_equal(decode(png(np.stack([gray] * 3, -1))).pixels, decode(png(gray)).pixels)


@pytest.mark.parametrize("size", [64, 97])
def test_decode_resizes_by_squashing_to_the_configured_size(size):
    wide = np.random.default_rng(4).integers(0, 256, (80, 160), dtype=np.uint8)
    resized = load_resized(png(wide), PreprocessConfig(image_size=size)).pixels  # stage 1 + the version's resize
    reference = np.asarray(Image.fromarray(wide).resize((size, size), Image.Resampling.BILINEAR))
    assert np.array_equal(resized, reference)


def test_dicom_bad_inputs_say_what_is_wrong():
    from model.errors import InvalidImageError

    rgb = dicom(np.zeros((64, 64), np.uint8), 8)
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(rgb))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    cases = {"colour": (buffer.getvalue(), "not_grayscale", "colour DICOM images are not chest radiographs"),
             "truncated": (rgb[:len(rgb) - 2000], "corrupt", "the DICOM pixel data could not be decoded: ")}
    ds = dcmread(io.BytesIO(rgb))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    cases["no pixels"] = (buffer.getvalue(), "no_pixel_data", "the DICOM file has no pixel data")
    for name, (data, reason, message) in cases.items():
        with pytest.raises(InvalidImageError) as err:
            decode(data)
        assert err.value.reason == reason and str(err.value).startswith(message), (name, str(err.value))


def test_a_window_centre_without_width_is_no_window():
    stored = ramp_12bit()
    no_window = decode(dicom(stored, 12)).pixels
    meta_only = dicom(stored, 12, window=None)
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(meta_only))
    ds.WindowCenter = 100  # centre alone: not a usable window
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert np.array_equal(decode(buffer.getvalue()).pixels, no_window)


def test_voi_lut_output_depth_comes_from_its_descriptor_not_the_stored_bits():
    lut = np.round(np.linspace(0, 65535, 4096) ** 1.0).astype(np.uint16)  # 12-bit input, 16-bit output
    stored = ramp_12bit(top=3000, displays=[lambda v: lut[v.astype(int)] / 65535.0])
    shown = decode(dicom(stored, 12, voi_lut=([4096, 0, 16], lut))).pixels
    assert np.array_equal(shown, to_8bit(lut[stored] / 65535.0))


def test_a_flat_dicom_is_black_and_values_beyond_the_window_clip():
    flat = decode(dicom(np.full((70, 70), 1234, np.uint16), 12)).pixels
    assert flat.shape == (70, 70) and not flat.any()
    stored = ramp_12bit(displays=[lambda v: linear_window(v, 2048.0, 1001.0)])
    shown = decode(dicom(stored, 12, window=(2048.0, 1001.0))).pixels
    assert shown.min() == 0 and shown.max() == 255
    assert np.array_equal(shown, to_8bit(linear_window(stored.astype(float), 2048.0, 1001.0)))
