"""ResNet-50 training on the preprocessed cache: profiles, EMA, early stopping, checkpoint + resume."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model.data import CachedData, DataError
from model.settings import available_cpus
from model.metrics import auc
from model.network import build_resnet50
from model.profiles import PROFILES, Profile, get_profile  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


class CacheDataset(Dataset):
    """Items by position ``i``, or by ``(epoch, i)`` from :class:`EpochSampler`: then the augmentation of
    image i in that epoch is seeded by (seed, epoch, i) alone."""

    def __init__(self, images: np.ndarray, indices: np.ndarray, labels: np.ndarray, transform, seed: int = 0):
        self.images, self.indices, self.labels, self.transform = images, indices, labels, transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, i = key
            self.transform.reseed(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        else:
            i = key
        x = self.transform(self.images[self.indices[i]])
        return torch.from_numpy(x), torch.tensor(float(self.labels[i]))


class EpochSampler(torch.utils.data.Sampler):
    """Shuffle by a generator seeded with (seed, epoch) and yield ``(epoch, i)``: the order and every
    augmentation depend only on the seed and the epoch, so a run resumed from ``last.pt`` repeats the
    uninterrupted one, with any number of DataLoader workers (persistent or not)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return ((self.epoch, i) for i in order.tolist())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_seed(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class EmaModel(torch.optim.swa_utils.AveragedModel):
    """Exponential moving average of weights AND BatchNorm statistics; the decay ramps up so that
    short runs are not dominated by the random initialisation."""

    def __init__(self, net: nn.Module, decay: float):
        def ema(avg, current, n_averaged):
            d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
            return avg * d + current * (1.0 - d)

        super().__init__(net, avg_fn=ema, use_buffers=True)


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict]
    best_epoch: int
    best_val_auc: float
    images_per_second: float
    seconds: float


def _device_setup(device: str | None):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        torch.set_num_threads(available_cpus())
        # bf16 autocast pays off only with native bf16 (AVX512-BF16/AMX: ~2.5x fp32); on an AVX2-only
        # CPU it is emulated and ~6x SLOWER than fp32, so fp32 + channels_last is used there.
        amp_dtype = torch.bfloat16 if cpu_has_native_bf16() else None
        if amp_dtype is None:
            log.info("this CPU has no native bf16 (capability %s): training in fp32 + channels_last",
                     torch.backends.cpu.get_cpu_capability())
    return dev, amp_dtype


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, dev: torch.device, amp_dtype) -> np.ndarray:
    net.eval()
    out = []
    for x, _ in loader:
        x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(net(x).float().reshape(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def train(cache_dir: str | Path, out_dir: str | Path, profile: Profile, pretrained: str | None = None,
          seed: int = 42, resume: bool = True, device: str | None = None, log_every: int = 20,
          on_epoch=None) -> TrainResult:
    """Train and write ``checkpoint.pt`` (best EMA weights + metadata), ``last.pt`` and ``history.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = CachedData.load(cache_dir)
    config = cache.config
    if config.image_size != profile.image_size:
        raise DataError(f"the cache holds {config.image_size} px images but profile {profile.name!r} trains at "
                        f"{profile.image_size} px; prepare the data with --image-size {profile.image_size}")
    seed_everything(seed)
    dev, amp_dtype = _device_setup(device)
    train_idx, train_y = cache.split("train")
    val_idx, val_y = cache.split("val")
    if len(val_idx) == 0 or len(set(val_y.tolist())) < 2:
        raise DataError("the validation split needs both classes; prepare the data with a larger val fraction")

    workers = profile.num_workers
    if workers is None:
        cpus = available_cpus()
        workers = min(12, max(1, cpus - 1)) if dev.type == "cuda" else min(2, cpus)
    loader_args = dict(num_workers=workers, pin_memory=dev.type == "cuda", worker_init_fn=_worker_seed,
                       persistent_workers=workers > 0)
    if workers > 0:
        loader_args["prefetch_factor"] = 4
    generator = torch.Generator().manual_seed(seed)
    from model.transforms import EvalTransform, TrainTransform  # albumentations/cv2 only when training

    sampler = EpochSampler(len(train_idx), seed)
    train_loader = DataLoader(CacheDataset(cache.images, train_idx, train_y, TrainTransform(config, profile.aug_strength),
                                           seed), batch_size=profile.batch_size, sampler=sampler,
                              drop_last=len(train_idx) > profile.batch_size, generator=generator, **loader_args)
    val_loader = DataLoader(CacheDataset(cache.images, val_idx, val_y, EvalTransform(config)),
                            batch_size=profile.batch_size * 2, shuffle=False, **loader_args)

    net = build_resnet50(pretrained, dropout=profile.dropout).to(dev).to(memory_format=torch.channels_last)
    ema = EmaModel(net, profile.ema_decay)
    n_pos, n_neg = int(train_y.sum()), int(len(train_y) - train_y.sum())
    # pos_weight balances the ~3:1 PNEUMONIA:NORMAL ratio in the loss.
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / max(n_pos, 1), device=dev))
    optimizer = torch.optim.AdamW(net.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
    steps_per_epoch = len(train_loader) if profile.max_steps_per_epoch is None else min(len(train_loader), profile.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * profile.epochs)
    warmup = max(1, int(profile.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 1% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp_dtype == torch.float16)

    history: list[dict] = []
    start_epoch, best_auc, best_epoch, stale = 0, -1.0, -1, 0
    last_path = out / "last.pt"
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=dev, weights_only=False)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_auc, best_epoch, stale = state["epoch"] + 1, state["best_auc"], state["best_epoch"], state["stale"]
        history = state["history"]
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (best val AUC %.4f at epoch %d)", last_path, start_epoch + 1, best_auc, best_epoch + 1)

    log.info("training ResNet-50 on %d images (%d pneumonia, %d normal), validating on %d; profile %s: %s; "
             "device %s, autocast %s, channels_last", len(train_idx), n_pos, n_neg, len(val_idx), profile.name,
             profile.description, dev, str(amp_dtype).replace("torch.", "") if amp_dtype else "off (fp32)")
    from tqdm import tqdm

    started = time.perf_counter()
    seen_images, train_seconds = 0, 0.0
    for epoch in range(start_epoch, profile.epochs):
        sampler.set_epoch(epoch)
        net.train()
        epoch_start = time.perf_counter()
        running, n_batches = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{profile.epochs}", unit="batch", mininterval=5,
                   disable=None)
        for step, (x, y) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(x).reshape(-1)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ema.update_parameters(net)
            running += float(loss.detach())
            n_batches += 1
            seen_images += len(y)
            bar.update(1)
            if log_every and (step + 1) % log_every == 0:
                bar.set_postfix(loss=f"{running / n_batches:.4f}")
            if bar.disable and (step + 1) % max(1, steps_per_epoch // 5) == 0:  # no TTY: progress as log lines
                log.info("epoch %d: %d/%d batches, loss %.4f, %.1f img/s", epoch + 1, step + 1, steps_per_epoch,
                         running / n_batches, n_batches * profile.batch_size / (time.perf_counter() - epoch_start))
        bar.close()
        epoch_train_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_train_seconds
        val_logits = predict_logits(ema.module, val_loader, dev, amp_dtype)
        val_auc = auc(val_y, val_logits)
        val_loss = float(nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(val_logits),
                                                                        torch.from_numpy(val_y.astype(np.float32))))
        record = {"epoch": epoch + 1, "train_loss": running / max(1, n_batches), "val_auc": val_auc,
                  "val_loss": val_loss, "lr": scheduler.get_last_lr()[0],
                  "train_images_per_second": n_batches * profile.batch_size / max(epoch_train_seconds, 1e-9),
                  "epoch_seconds": time.perf_counter() - epoch_start}
        history.append(record)
        improved = val_auc > best_auc
        if improved:
            best_auc, best_epoch, stale = val_auc, epoch, 0
            _save_checkpoint(out / "checkpoint.pt", ema.module, config, profile, seed, record)
        else:
            stale += 1
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f%s  %.1f img/s  %.0f s", epoch + 1,
                 profile.epochs, record["train_loss"], val_loss, val_auc, " *" if improved else "",
                 record["train_images_per_second"], record["epoch_seconds"])
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "best_auc": best_auc,
                    "best_epoch": best_epoch, "stale": stale, "history": history, "rng": torch.get_rng_state()},
                   last_path)
        if on_epoch:
            on_epoch(record)
        if stale >= profile.patience:
            log.info("early stopping: val AUC has not improved for %d epochs", stale)
            break

    (out / "history.json").write_text(json.dumps(history, indent=2))
    throughput = seen_images / train_seconds if train_seconds else 0.0
    result = TrainResult(out / "checkpoint.pt", history, best_epoch + 1, best_auc, throughput,
                         time.perf_counter() - started)
    log.info("best val AUC %.4f at epoch %d; %.1f img/s; %.0f s", best_auc, best_epoch + 1, throughput, result.seconds)
    return result


def _save_checkpoint(path: Path, net: nn.Module, config, profile: Profile, seed: int, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": net.state_dict(), "preprocess": config.to_dict(), "profile": asdict(profile),
                "seed": seed, "epoch": record["epoch"], "val_auc": record["val_auc"],
                "arch": "resnet50-gray-1logit"}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written best checkpoint


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    meta = torch.load(path, map_location="cpu", weights_only=False)
    net = build_resnet50(None, dropout=meta["profile"].get("dropout", 0.2), for_training=False)
    net.load_state_dict(meta["state_dict"])
    net.eval()
    return net, meta
