"""The lung segmentation model: MONAI's 2-D U-Net trained on ``lung_masks_256``, exported to ONNX.

Data: frontal radiographs with binary lung-field masks (``images/`` and ``masks/`` of the same names, plus
``sources.csv`` with a ``patient`` column). The split is by patient (70 / 15 / 15 % train / val / test): a
patient's films never sit on two sides. Random init, nothing downloaded.

Training: DiceCE loss (MONAI), AdamW, Albumentations geometry and exposure changes applied to image and mask
alike, early stopping on the val patients' mean Dice. The test patients' Dice (per image, mean with a
patient-level bootstrap CI) is written to ``lung.json`` beside ``lung.onnx``; the folder is what a model
bundle carries (:mod:`model.lung_fields` runs it, without torch).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.lung_fields import (LUNG_INPUT, LUNG_META, LUNG_ONNX, LUNG_OUTPUT, SEGMENTATION_SIZE, LungModelInfo,
                               segmentation_input)
from model.preprocessing import PreprocessConfig, resize

log = logging.getLogger(__name__)

#: MONAI UNet channels per level: 1.6 M parameters, ~6.5 MB as ONNX; ~20 img/s training at 128 px on 2 cores.
CHANNELS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LungTrainSettings:
    size: int = SEGMENTATION_SIZE
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    patience: int = 8
    seed: int = 42
    channels: tuple[int, ...] = CHANNELS
    res_units: int = 2
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: int | None = None  # first N pairs only (tests)
    n_bootstrap: int = 1000
    # Train no further: score and export the best weights so far (OUT/lung.pt), e.g. of a run that was stopped.
    finish_only: bool = False


class LungDataError(ValueError):
    """The lung mask folder is missing or malformed (a user error: one line, exit 2)."""


def build_unet(channels: tuple[int, ...] = CHANNELS, res_units: int = 2) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=res_units)


def load_pairs(folder: str | Path, size: int, limit: int | None = None):
    """(images uint8 [N,S,S], masks bool [N,S,S], patients [N]) with the images squash-resized by the
    preprocessing's own ``resize`` (the pixels the segmenter will see) and the masks by nearest neighbour."""
    from PIL import Image

    from model.lung_fields import resize_mask

    root = Path(folder)
    sources = root / "sources.csv"
    if not (root / "images").is_dir() or not (root / "masks").is_dir() or not sources.is_file():
        raise LungDataError(f"{root} holds no images/, masks/ and sources.csv (see ../shared/data/README.md)")
    with sources.open() as fh:
        rows = [r for r in csv.DictReader(fh)]
    rows = sorted(rows, key=lambda r: r["file"])[:limit] if limit else sorted(rows, key=lambda r: r["file"])
    config = PreprocessConfig(image_size=size)
    images, masks, patients = [], [], []
    for row in rows:
        image_path, mask_path = root / "images" / row["file"], root / "masks" / row["file"]
        if not image_path.is_file() or not mask_path.is_file():
            raise LungDataError(f"{row['file']}: image or mask missing under {root}")
        gray = np.asarray(Image.open(image_path).convert("L"), dtype=np.uint8)
        mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        images.append(resize(gray, config))
        masks.append(resize_mask(mask, size, size))
        # the patient ids of the collection are global; a film without one is its own patient
        patients.append(row.get("patient") or f"file:{row['file']}")
    if len(images) < 8:
        raise LungDataError(f"only {len(images)} image/mask pairs under {root}: too few to train and test")
    return np.stack(images), np.stack(masks), np.array(patients)


def split_patients(patients: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """"train" / "val" / "test" per image, grouped by patient."""
    from sklearn.model_selection import GroupShuffleSplit

    index = np.arange(len(patients))
    rest, test = next(GroupShuffleSplit(1, test_size=test_fraction, random_state=seed).split(index, groups=patients))
    val_share = val_fraction / (1.0 - test_fraction)
    fit, val = next(GroupShuffleSplit(1, test_size=val_share, random_state=seed + 1).split(rest,
                                                                                            groups=patients[rest]))
    split = np.full(len(patients), "train", dtype=object)
    split[rest[val]] = "val"
    split[test] = "test"
    return split


def augmentation(seed: int):
    """Geometry and exposure a frontal film plausibly has, on image and mask alike (Albumentations)."""
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    pipeline = A.Compose([
        A.Affine(scale=(0.8, 1.15), translate_percent=(-0.08, 0.08), rotate=(-12, 12), shear=(-4, 4),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.9),
        A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.3, p=0.8),
        A.RandomGamma(gamma_limit=(70, 140), p=0.5),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
    ])
    pipeline.set_random_seed(seed)
    return pipeline


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """2|P∩T| / (|P|+|T|) per image (1 when both are empty)."""
    pred, truth = pred.reshape(len(pred), -1).astype(bool), truth.reshape(len(truth), -1).astype(bool)
    inter = (pred & truth).sum(axis=1)
    total = pred.sum(axis=1) + truth.sum(axis=1)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def patient_bootstrap_ci(values: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95 % percentile CI of the mean, resampling patients (their films stay together)."""
    groups = {}
    for v, p in zip(values, patients):
        groups.setdefault(p, []).append(v)
    sums = np.array([sum(g) for g in groups.values()])
    counts = np.array([len(g) for g in groups.values()])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _normalise(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    # the same two float32 operations as model.lung_fields.segmentation_input
    scale, offset = np.float32(1.0 / (255.0 * std)), np.float32(mean / std)
    return torch.from_numpy((images.astype(np.float32) * scale - offset)[:, None])


@torch.no_grad()
def predict_masks(net: nn.Module, images: np.ndarray, info: LungModelInfo, batch_size: int = 32) -> np.ndarray:
    net.eval()
    out = [net(_normalise(images[i:i + batch_size], info.mean, info.std))[:, 0] > 0
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0,) + images.shape[1:], dtype=bool)


def train_lung_model(data: str | Path, out_dir: str | Path, settings: LungTrainSettings = LungTrainSettings(),
                     threads: int | None = None) -> dict:
    """Train, pick the epoch on val Dice, score the test patients, export ``lung.onnx`` + ``lung.json``."""
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    from model.settings import available_cpus

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    torch.set_num_threads(threads or available_cpus())
    images, masks, patients = load_pairs(data, settings.size, settings.limit)
    split = split_patients(patients, settings.val_fraction, settings.test_fraction, settings.seed)
    fit, val, test = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    mean = float(images[fit].mean() / 255.0)
    std = float(images[fit].std() / 255.0)
    info = LungModelInfo(size=settings.size, mean=round(mean, 6), std=round(std, 6))
    log.info("lung U-Net: %d train / %d val / %d test films (%d / %d / %d patients), %d px, %d epochs",
             len(fit), len(val), len(test), *(len(set(patients[i].tolist())) for i in (fit, val, test)),
             settings.size, settings.epochs)

    net = build_unet(settings.channels, settings.res_units)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps = max(1, len(fit) // settings.batch_size) * settings.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps, pct_start=0.1)
    augment = augmentation(settings.seed)
    rng = np.random.default_rng(settings.seed)
    best, best_epoch, stale, history = -1.0, -1, 0, []
    if settings.finish_only and not (out / "lung.pt").is_file():
        raise LungDataError(f"nothing to finish: no {out / 'lung.pt'} (train first)")
    for epoch in range(0 if settings.finish_only else settings.epochs):
        net.train()
        order = rng.permutation(fit)
        losses = []
        batches = [order[i:i + settings.batch_size] for i in range(0, len(order) - settings.batch_size + 1,
                                                                  settings.batch_size)] or [order]
        for batch in tqdm(batches, desc=f"lung epoch {epoch + 1}/{settings.epochs}", mininterval=10, disable=None):
            pairs = [augment(image=images[i], mask=masks[i].astype(np.uint8)) for i in batch]
            x = _normalise(np.stack([p["image"] for p in pairs]), info.mean, info.std)
            y = torch.from_numpy(np.stack([p["mask"] for p in pairs]).astype(np.float32)[:, None])
            loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < steps:
                scheduler.step()
            losses.append(loss.item())
        val_dice = float(dice_per_image(predict_masks(net, images[val], info), masks[val]).mean())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val_dice})
        improved = val_dice > best
        if improved:
            best, best_epoch, stale = val_dice, epoch + 1, 0
            torch.save(net.state_dict(), out / "lung.pt")
        else:
            stale += 1
        log.info("lung epoch %d/%d  loss %.4f  val Dice %.4f%s", epoch + 1, settings.epochs, history[-1]["loss"],
                 val_dice, " *" if improved else "")
        if stale >= settings.patience:
            log.info("early stopping: val Dice has not improved for %d epochs", stale)
            break

    net.load_state_dict(torch.load(out / "lung.pt", map_location="cpu", weights_only=True))
    net.eval()
    if settings.finish_only:
        best = float(dice_per_image(predict_masks(net, images[val], info), masks[val]).mean())
        log.info("finishing the stopped run: its best weights score val Dice %.4f", best)
    test_dice = dice_per_image(predict_masks(net, images[test], info), masks[test])
    dice = {"val": best, "best_epoch": None if settings.finish_only else best_epoch, "test": float(test_dice.mean()),
            "test_median": float(np.median(test_dice)),
            "test_ci95": patient_bootstrap_ci(test_dice, patients[test], settings.n_bootstrap, settings.seed),
            "n_test": int(len(test)), "n_test_patients": int(len(set(patients[test].tolist()))),
            "ci": "percentile bootstrap over test patients"}
    info = LungModelInfo(size=info.size, mean=info.mean, std=info.std, dice=dice,
                         training={"data": str(data), "n_train": int(len(fit)), "n_val": int(len(val)),
                                   "epochs_run": len(history), "finished_early": settings.finish_only,
                                   "seed": settings.seed,
                                   "channels": list(settings.channels), "res_units": settings.res_units,
                                   "arch": "monai.networks.nets.UNet",
                                   "seconds": round(time.perf_counter() - started, 1)})
    export_lung_onnx(net, settings.size, out / LUNG_ONNX)
    (out / LUNG_META).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    log.info("lung U-Net: test Dice %.4f (95%% CI %.4f-%.4f, %d films of %d patients); %s", dice["test"],
             *dice["test_ci95"], dice["n_test"], dice["n_test_patients"], out / LUNG_ONNX)
    return info.to_dict()


def export_lung_onnx(net: nn.Module, size: int, path: str | Path) -> Path:
    """``image`` [N,1,S,S] -> ``lung_logit`` [N,1,S,S], dynamic batch (the TorchScript exporter, as the classifier)."""
    net.eval()
    path = Path(path)
    torch.onnx.export(net, (torch.zeros(2, 1, size, size),), str(path), input_names=[LUNG_INPUT],
                      output_names=[LUNG_OUTPUT], dynamic_axes={LUNG_INPUT: {0: "batch"}, LUNG_OUTPUT: {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def torch_logits(net: nn.Module, pixels: np.ndarray, info: LungModelInfo) -> np.ndarray:
    """The PyTorch module's logits for one stage-1 image, from the same input the ONNX segmenter gets."""
    with torch.no_grad():
        return net.eval()(torch.from_numpy(segmentation_input(pixels, info)))[0, 0].numpy()
