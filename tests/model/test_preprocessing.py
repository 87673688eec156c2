"""The ONE preprocessing definition: what training sees is exactly what serving computes."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from model.data import CachedData, SplitFractions, prepare
from model.errors import InvalidImageError
from model.preprocessing import PreprocessConfig, decode, normalize, to_tensor
from model.transforms import EvalTransform, TrainTransform
from numerics import normalize_bound


def test_training_and_serving_tensors_are_identical_on_full_resolution_uploads(tmp_path, shared_full):
    """Cache built by `data prepare` + the training eval transform == the serving path on the raw bytes."""
    root = tmp_path / "data" / "train"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((shared_full / "train" / cls).iterdir())[:12]:
            shutil.copy(f, root / cls / f.name)
    prepare(str(tmp_path / "data"), tmp_path / "cache", 128, SplitFractions(0.25, 0.0, 0), workers=2)
    cache = CachedData.load(tmp_path / "cache")
    transform = EvalTransform(cache.config)
    assert len(cache.manifest) == 24
    for row in cache.manifest:
        served = to_tensor((tmp_path / "data" / row["file"]).read_bytes(), cache.config)
        trained = transform(cache.images[row["index"]])
        assert served.shape == (1, 1, 128, 128) and served.dtype == np.float32
        assert np.array_equal(served[0], trained), f"training and serving differ for row {row['index']}"


def test_normalisation_uses_the_stored_statistics():
    config = PreprocessConfig(image_size=4, mean=0.4, std=0.2)
    x = normalize(np.full((4, 4), 255, np.uint8), config)
    assert x.shape == (1, 1, 4, 4)
    assert (np.abs(x - (1.0 - 0.4) / 0.2) <= normalize_bound(255, 0.4, 0.2)).all()
    assert PreprocessConfig.from_dict(config.to_dict()) == config


def test_augmentation_changes_pixels_but_keeps_shape_and_scale():
    config = PreprocessConfig(image_size=64)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    out = TrainTransform(config)(pixels)
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    assert np.isfinite(out).all()


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_stored_grayscale_equals_grayscale():
    gray = np.random.default_rng(1).integers(0, 255, (100, 100), dtype=np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    a, b = decode(_encode(gray, "PNG")), decode(_encode(rgb, "PNG"))
    assert np.array_equal(a.pixels, b.pixels)
    assert b.colourfulness == 0.0


def test_16_bit_png_is_rescaled():
    wide = (np.tile(np.linspace(0, 4095, 100), (100, 1))).astype(np.uint16)
    image = decode(_encode(wide, "PNG"))
    assert image.pixels.dtype == np.uint8 and image.pixels.min() == 0 and image.pixels.max() == 255


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"definitely not an image", "not_an_image"),
])
def test_bad_bytes_raise_clear_errors(data, reason):
    with pytest.raises(InvalidImageError) as err:
        decode(data)
    assert err.value.reason == reason


def test_truncated_jpeg_and_decompression_bomb_are_refused():
    jpeg = _encode(np.random.default_rng(2).integers(0, 255, (300, 300), dtype=np.uint8), "JPEG")
    with pytest.raises(InvalidImageError) as err:
        decode(jpeg[: len(jpeg) // 2])
    assert err.value.reason == "corrupt"
    bomb = io.BytesIO()
    Image.new("L", (20000, 20000)).save(bomb, format="PNG")
    with pytest.raises(InvalidImageError) as err:
        decode(bomb.getvalue())
    assert err.value.reason == "too_large"
