"""Self-supervised pretraining of the grayscale ResNet-50 (SimCLR, with ``lightly``'s loss and projection head).

What ImageNet weights gave the published baselines, which cannot be downloaded here: a backbone that has
seen radiographs before it sees labels. Two augmented views of each film of the cache's ``train`` split (never
val, holdout or sanity, and never the external set) are pulled together against the other films of the batch
(NT-Xent). The views are the exposure, blur, noise, crop and geometry changes a film plausibly has
(Albumentations). The result, ``backbone.pt``, is a grayscale ResNet-50 state dict without the head, which
``pneumoscope train --pretrained`` fine-tunes like ImageNet weights. Resumes from ``last_pretrain.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    image_size: int = 96
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.2  # NT-Xent; 0.1-0.5 in the SimCLR paper, lower for small batches
    projection_dim: int = 128
    seed: int = 42
    max_steps_per_epoch: int | None = None  # smoke runs


def view_augmentation(image_size: int, seed: int):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    views = A.Compose([
        A.RandomResizedCrop(size=(image_size, image_size), scale=(0.35, 1.0), ratio=(0.75, 1.33)),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-10, 10), shear=(-5, 5), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.4, p=0.8),
        A.RandomGamma(gamma_limit=(60, 160), p=0.5),
        A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0), p=0.5),
        A.GaussNoise(std_range=(0.01, 0.06), p=0.3),
    ])
    views.set_random_seed(seed)
    return views


class _TwoViews(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, indices: np.ndarray, image_size: int, seed: int):
        self.images, self.indices, self.image_size, self.seed = images, indices, image_size, seed
        self.augment = view_augmentation(image_size, seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key
        self.augment.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        pixels = np.ascontiguousarray(self.images[self.indices[i]])
        a, b = (self.augment(image=pixels)["image"] for _ in range(2))
        return torch.from_numpy(np.array(a)[None]), torch.from_numpy(np.array(b)[None])


class _EpochKeys(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return ((self.epoch, int(i)) for i in order)

    def __len__(self) -> int:
        return self.n


def pretrain(cache_dir: str | Path, out_dir: str | Path, settings: PretrainSettings = PretrainSettings(),
             device: str | None = None) -> dict:
    """SimCLR on the cache's training images; writes ``backbone.pt`` and ``pretrain.json``."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from tqdm import tqdm

    from model.data import CachedData
    from model.network import build_resnet50
    from model.training import DeviceNormalize, _device_setup, _worker_seed, seed_everything

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    cache = CachedData.load(cache_dir)
    train_idx, _ = cache.split("train")
    dev, amp_dtype = _device_setup(device)
    backbone = build_resnet50(None)
    backbone.fc = nn.Identity()
    head = SimCLRProjectionHead(2048, 512, settings.projection_dim)
    model = nn.Sequential(backbone, head).to(dev).to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=settings.temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    dataset = _TwoViews(cache.images, train_idx, settings.image_size, settings.seed)
    batch_size = min(settings.batch_size, len(dataset))  # a tiny cache still makes one batch
    sampler = _EpochKeys(len(dataset), settings.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=2, worker_init_fn=_worker_seed, persistent_workers=True)
    steps = len(loader) if settings.max_steps_per_epoch is None else min(len(loader), settings.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps * settings.epochs))
    normalize = DeviceNormalize(cache.config, dev)
    last, start, history = out / "last_pretrain.pt", 0, []
    if last.exists():
        state = torch.load(last, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["epoch"] + 1, state["history"]
        log.info("resumed SimCLR pretraining at epoch %d", start + 1)
    log.info("SimCLR pretraining of ResNet-50 on %d training films at %d px, batch %d, %d epochs, %s", len(train_idx),
             settings.image_size, settings.batch_size, settings.epochs,
             str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32")
    for epoch in range(start, settings.epochs):
        model.train()
        sampler.epoch = epoch
        started, losses = time.perf_counter(), []
        batches = iter(loader)
        for _ in tqdm(range(steps), desc=f"pretrain {epoch + 1}/{settings.epochs}", mininterval=10, disable=None):
            a, b = next(batches)
            x = normalize(torch.cat([a, b]).to(dev))
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                z = model(x).float()
            loss = criterion(z[:len(a)], z[len(a):])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "loss": float(torch.stack(losses).mean()), "seconds": round(seconds, 1),
                  "images_per_second": round(steps * batch_size / seconds, 2)}
        history.append(record)
        log.info("pretrain epoch %d/%d  NT-Xent %.4f  %.1f img/s  %.0f s", epoch + 1, settings.epochs, record["loss"],
                 record["images_per_second"], seconds)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)
    torch.save({k: v for k, v in backbone.state_dict().items()}, out / "backbone.pt")
    report = {"settings": asdict(settings), "history": history, "n_images": int(len(train_idx)),
              "seconds": round(sum(r["seconds"] for r in history), 1), "backbone": str(out / "backbone.pt"),
              "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"}
    (out / "pretrain.json").write_text(json.dumps(report, indent=2))
    return report
