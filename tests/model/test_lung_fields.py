"""The CAM lung share, the lung box and the lung crop of stage 2, on hand-computed cases (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.lung_fields import box_pixels, crop, lung_box, lung_share, lung_shares, resize_mask, upsample_cam
from model.preprocessing import PreprocessConfig, dilate, lung_view


def left_half(size: int = 4) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[:, : size // 2] = True
    return mask


def test_uniform_cam_share_is_the_mask_area():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 1:7] = True  # 18 of 64 pixels
    assert lung_share(np.full((2, 2), 3.0), mask) == pytest.approx(18 / 64, abs=1e-7)


def test_share_by_hand_with_bilinear_upsampling():
    """cam [[1, 0], [1, 0]] to 4 x 4, pixel centres at x = -0.25, 0.25, 0.75, 1.25 of the CAM grid (edges clamped):
    each row is 1, 0.75, 0.25, 0 (sum 2); the left half holds 1.75 of it: share 0.875."""
    cam = np.array([[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(upsample_cam(cam, 4, 4)[0], [1.0, 0.75, 0.25, 0.0], atol=1e-6)
    assert lung_share(cam, left_half()) == pytest.approx(0.875, abs=1e-6)
    # negative evidence is no mass: the same share with the right column negative
    assert lung_share(np.array([[1.0, -5.0], [1.0, -5.0]]), left_half()) == pytest.approx(0.875, abs=1e-6)
    # and the mirror image: 0.25 / 2 = 0.125
    assert lung_share(cam[:, ::-1], left_half()) == pytest.approx(0.125, abs=1e-6)


def test_share_all_inside_all_outside_and_undefined():
    cam = np.zeros((2, 2))
    cam[0, 0] = 2.0
    everywhere, nowhere = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    assert lung_share(cam, everywhere) == pytest.approx(1.0)
    assert lung_share(cam, nowhere) == 0.0
    assert math.isnan(lung_share(-np.ones((2, 2)), everywhere))  # no positive mass: nothing to place
    np.testing.assert_allclose(lung_shares(np.stack([cam, cam[:, ::-1]]), left_half()), [0.875, 0.125], atol=1e-6)


def test_share_on_the_cam_grid_equals_the_share_of_the_upsampled_heatmap():
    """The share is taken on the CAM's grid against the projected mask: the same number as summing the upsampled
    heatmap itself, for any grid, mask size and coverage (float64 sums of a float32 resampling: 1e-6)."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        cam = (3 * rng.standard_normal(rng.integers(2, 12, 2))).astype(np.float32)
        height, width = rng.integers(8, 160, 2)
        mask = rng.random((height, width)) < rng.random()
        heat = upsample_cam(cam, height, width)
        total = heat.sum(dtype=np.float64)
        if total <= 0:
            assert math.isnan(lung_share(cam, mask))
            continue
        assert lung_share(cam, mask) == pytest.approx(heat[mask].sum(dtype=np.float64) / total, abs=1e-6)


def test_lung_box_by_hand():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 4:14] = True  # rows 2-5, columns 4-13: 40 of 200 pixels (20 %)
    top, left, bottom, right = lung_box(mask, margin=0.0)
    assert (top, left, bottom, right) == pytest.approx((0.2, 0.2, 0.6, 0.7))
    # a 10 % margin of the box's own height (0.4) and width (0.5), clipped to the image
    assert lung_box(mask, margin=0.1) == pytest.approx((0.16, 0.15, 0.64, 0.75))
    assert lung_box(mask, margin=1.0) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert lung_box(np.zeros((10, 20), bool)) is None  # no lungs: nothing is cropped
    assert lung_box(mask, min_area=0.25) is None


def test_crop_takes_whole_pixels_around_the_box():
    pixels = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert box_pixels((0.15, 0.2, 0.55, 0.71), 10, 10) == (1, 2, 6, 8)  # floor the start, ceil the end
    np.testing.assert_array_equal(crop(pixels, (0.15, 0.2, 0.55, 0.71)), pixels[1:6, 2:8])
    assert crop(pixels, None) is pixels


def test_resize_mask_and_dilate():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    big = resize_mask(mask, 8, 8)
    assert big.sum() == 4 and big[2:4, 2:4].all()
    grown = dilate(mask, 1)
    assert grown.sum() == 9 and grown[0:3, 0:3].all()


def test_lung_view_crops_and_masks_stage1_pixels():
    """Stage 2 with a lung crop: the box is cut from the stage-1 pixels, then resized as usual; "mask" zeroes what
    lies outside the dilated lungs; without lungs found nothing is cropped or blanked."""
    from model.preprocessing import resize

    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 255, (64, 48), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:16] = True  # 12.5 % of the frame
    config = PreprocessConfig(image_size=16, lung_crop="box", lung_margin=0.0)
    view, box = lung_view(pixels, config, mask)
    assert box == pytest.approx((0.25, 0.25, 0.75, 0.5))
    np.testing.assert_array_equal(view, resize(pixels[16:48, 12:24], config))

    masked, box = lung_view(pixels, PreprocessConfig(image_size=64, lung_crop="mask"), mask)
    assert box == (0.0, 0.0, 1.0, 1.0)
    inside = resize_mask(dilate(mask, 6), 64, 48)
    resized = resize(np.where(inside, pixels, 0).astype(np.uint8), PreprocessConfig(image_size=64))
    np.testing.assert_array_equal(masked, resized)

    empty = np.zeros((32, 32), bool)
    for mode in ("box", "mask", "box+mask"):
        view, box = lung_view(pixels, PreprocessConfig(image_size=16, lung_crop=mode), empty)
        assert box == (0.0, 0.0, 1.0, 1.0)
        np.testing.assert_array_equal(view, resize(pixels, PreprocessConfig(image_size=16)))
    with pytest.raises(ValueError, match="lung mask"):
        lung_view(pixels, config, None)


def test_unknown_preprocessing_stage_is_refused():
    """A bundle naming a stage-2 option this code does not run is refused, not served on other pixels."""
    data = PreprocessConfig(image_size=64, lung_crop="box").to_dict()
    assert PreprocessConfig.from_dict(data).lung_crop == "box"
    with pytest.raises(ValueError, match="does not know"):
        PreprocessConfig.from_dict(dict(data, lung_rotation="upright"))
    with pytest.raises(ValueError, match="unknown lung crop"):
        PreprocessConfig(image_size=64, lung_crop="heart")
