"""Training augmentation (Albumentations) on the cached uint8 images, then the shared normalisation."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import albumentations as A
import cv2
import numpy as np

from model.preprocessing import PreprocessConfig, apply_field_mask, normalize

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV threads would oversubscribe 2 cores


class BorderErasing(A.ImageOnlyTransform):
    """Erase 1-3 random patches inside the border band, where side markers ("R", "L"), burned-in text and the
    shoulders sit: a shortcut regulariser (the ``demo`` model's heatmap lit up the corner marker). Each patch
    gets a random gray level, so neither "bright blob in the corner" nor "blank corner" carries the label."""

    def __init__(self, band: float = 0.2, size: tuple[float, float] = (0.06, 0.2), max_patches: int = 3,
                 p: float = 0.5):
        super().__init__(p=p)
        self.band, self.size, self.max_patches = band, size, max_patches

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        rng = self.random_generator
        patches = []
        for _ in range(int(rng.integers(1, self.max_patches + 1))):
            ph = max(1, int(rng.uniform(*self.size) * height))
            pw = max(1, int(rng.uniform(*self.size) * width))
            band_h, band_w = max(ph, int(self.band * height)), max(pw, int(self.band * width))
            side = rng.integers(4)  # top, bottom, left, right band; position along it uniform
            if side < 2:
                y = int(rng.integers(0, band_h - ph + 1)) if side == 0 else height - band_h + int(
                    rng.integers(0, band_h - ph + 1))
                x = int(rng.integers(0, width - pw + 1))
            else:
                x = int(rng.integers(0, band_w - pw + 1)) if side == 2 else width - band_w + int(
                    rng.integers(0, band_w - pw + 1))
                y = int(rng.integers(0, height - ph + 1))
            patches.append((y, x, ph, pw, int(rng.integers(0, 256))))
        return {"patches": patches}

    def apply(self, img, patches=(), **params):
        out = img.copy()
        for y, x, ph, pw, value in patches:
            out[y:y + ph, x:x + pw] = value
        return out

    def get_transform_init_args_names(self):
        return ("band", "size", "max_patches")


def acquisition_augmentation(image_size: int, strength: float = 1.0) -> list:
    """What another hospital's machine and projection change in a film (issue 17's candidate, ``--augment
    acquisition``), on top of :func:`train_augmentation`: the exposure curve (gamma) and contrast of another
    detector and its processing (local contrast, edge enhancement), its blur and resolution, its noise, other
    collimation (crops and rescales), and the geometry of an AP film (supine, source closer: a wider heart and
    mediastinum, the film taken at an angle)."""
    s = strength
    return [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(1 - 0.35 * s, 1.0), ratio=(0.8, 1.25), p=0.5),
        A.Perspective(scale=(0.01, 0.01 + 0.05 * s), fit_output=False, border_mode=cv2.BORDER_CONSTANT, fill=0,
                      p=0.3),
        A.Affine(scale={"x": (1 - 0.1 * s, 1 + 0.1 * s), "y": (1 - 0.06 * s, 1 + 0.06 * s)},
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.4),  # anisotropic: AP magnification
        A.RandomGamma(gamma_limit=(int(100 - 45 * s), int(100 + 60 * s)), p=0.5),
        A.OneOf([A.CLAHE(clip_limit=(1.0, 1.0 + 3.0 * s), tile_grid_size=(8, 8)),
                 A.Sharpen(alpha=(0.1, 0.1 + 0.3 * s), lightness=(0.9, 1.1)),
                 A.Equalize()], p=0.3),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.2, 0.2 + 1.2 * s)),
                 A.Downscale(scale_range=(1 - 0.6 * s, 0.9), interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                                "upscale": cv2.INTER_LINEAR})],
                p=0.4),
        A.GaussNoise(std_range=(0.01, 0.01 + 0.06 * s), p=0.3),
    ]


def train_augmentation(strength: float = 1.0, erase_borders: float = 0.0, acquisition: bool = False,
                       image_size: int | None = None) -> A.Compose:
    """Geometry and exposure changes a radiograph plausibly has; ``strength`` scales all of them."""
    s = strength
    steps = [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(1 - 0.15 * s, 1 + 0.15 * s), translate_percent=(-0.08 * s, 0.08 * s),
                 rotate=(-10 * s, 10 * s), shear=(-5 * s, 5 * s), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8),
        A.RandomBrightnessContrast(brightness_limit=0.25 * s, contrast_limit=0.25 * s, p=0.8),
        A.RandomGamma(gamma_limit=(int(100 - 30 * s), int(100 + 30 * s)), p=0.3),
        A.GaussNoise(std_range=(0.01, 0.01 + 0.04 * s), p=0.3),
    ]
    if acquisition:
        if image_size is None:
            raise ValueError("acquisition augmentation needs the image size (its crops are resized back to it)")
        steps = steps[:1] + acquisition_augmentation(image_size, strength) + steps[1:]
    if erase_borders > 0:
        steps.append(BorderErasing(p=erase_borders))
    return A.Compose(steps)


class TrainTransform:
    """uint8 (S, S) -> augmented uint8 (``pixels``, what the DataLoader ships) or float32 (1, S, S).

    Albumentations draws from its own generators, not from ``np.random``/``random``: without ``seed`` (or
    :meth:`reseed`) every run augments differently whatever ``seed_everything`` did.
    """

    def __init__(self, config: PreprocessConfig, strength: float = 1.0, erase_borders: float = 0.0,
                 seed: int | None = None, acquisition: bool = False):
        self.config = config
        self.augment = train_augmentation(strength, erase_borders, acquisition, config.image_size)
        self.augment.set_random_seed(seed)

    def reseed(self, seed: int) -> None:
        self.augment.set_random_seed(int(seed))

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        augmented = self.augment(image=np.ascontiguousarray(pixels))["image"]
        return apply_field_mask(augmented, self.config)  # after the geometry: the field stays where serving has it

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return normalize(self.pixels(pixels), self.config)[0]


class EvalTransform:
    """uint8 (S, S) -> float32 (1, S, S): exactly the serving path after decode + resize."""

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        return apply_field_mask(np.asarray(pixels), self.config)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return normalize(np.asarray(pixels), self.config)[0]
