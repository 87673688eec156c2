"""Training augmentation (Albumentations) on the cached uint8 images, then the shared normalisation."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import albumentations as A
import cv2
import numpy as np

from model.preprocessing import PreprocessConfig, normalize

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV threads would oversubscribe 2 cores


def train_augmentation(strength: float = 1.0) -> A.Compose:
    """Geometry and exposure changes a radiograph plausibly has; ``strength`` scales all of them."""
    s = strength
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(1 - 0.15 * s, 1 + 0.15 * s), translate_percent=(-0.08 * s, 0.08 * s),
                 rotate=(-10 * s, 10 * s), shear=(-5 * s, 5 * s), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8),
        A.RandomBrightnessContrast(brightness_limit=0.25 * s, contrast_limit=0.25 * s, p=0.8),
        A.RandomGamma(gamma_limit=(int(100 - 30 * s), int(100 + 30 * s)), p=0.3),
        A.GaussNoise(std_range=(0.01, 0.01 + 0.04 * s), p=0.3),
    ])


class TrainTransform:
    """uint8 (S, S) -> float32 (1, S, S), augmented.

    Albumentations draws from its own generators, not from ``np.random``/``random``: without ``seed`` (or
    :meth:`reseed`) every run augments differently whatever ``seed_everything`` did.
    """

    def __init__(self, config: PreprocessConfig, strength: float = 1.0, seed: int | None = None):
        self.config = config
        self.augment = train_augmentation(strength)
        self.augment.set_random_seed(seed)

    def reseed(self, seed: int) -> None:
        self.augment.set_random_seed(int(seed))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        augmented = self.augment(image=np.ascontiguousarray(pixels))["image"]
        return normalize(augmented, self.config)[0]


class EvalTransform:
    """uint8 (S, S) -> float32 (1, S, S): exactly the serving path after decode + resize."""

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return normalize(np.asarray(pixels), self.config)[0]
