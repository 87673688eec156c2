"""Training throughput in ONE run: loader-only, step-only and end-to-end img/s, so the bottleneck is visible.

    python benchmarks/train_throughput.py --device cuda --image-size 224 --batch-size 256 --steps 40
    python benchmarks/train_throughput.py --device cpu --image-size 64 --batch-size 32 --steps 6 --compare-main

- ``loader``: the training DataLoader alone (Albumentations in the workers, pinned memory, copy to the device);
- ``step``: the training step alone on a batch resident on the device (forward, loss, backward, AdamW, EMA);
- ``end_to_end``: the training loop's inner part, loader and step together (what an epoch costs without
  validation); ``overhead`` = 1 - end_to_end / step.
- ``--compare-main``: the same three figures for the loop as it was before issue 9 (float32 batches
  normalised in the workers, ``AveragedModel`` with a Python ``avg_fn``, ``float(loss)`` every step, foreach
  AdamW), measured alternately with the current loop in the same run.

The images are a prepared cache (``--cache``) or random uint8 frames of the requested size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from model.preprocessing import PreprocessConfig
from model.profiles import get_profile
from model.training import (CacheDataset, DeviceNormalize, _device_setup, build_training, cpu_has_native_bf16,
                            default_workers, loader_options, train_step)
from model.transforms import TrainTransform


class _Cycle:
    """An endless iterator over a DataLoader (persistent workers keep running between passes)."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, steps: int, batch: int, dev) -> float:
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(dev)
    return steps * batch / (time.perf_counter() - start)


class _FloatTransform:
    """Main's loader output: float32 (1, S, S) normalised in the worker."""

    def __init__(self, transform: TrainTransform):
        self.transform = transform

    def pixels(self, pixels):
        return self.transform(pixels)[0]


def _main_ema(net: nn.Module, decay: float):
    def ema(avg, current, n_averaged):
        d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
        return avg * d + current * (1.0 - d)

    return torch.optim.swa_utils.AveragedModel(net, avg_fn=ema, use_buffers=True)


def measure(args, images: np.ndarray, labels: np.ndarray, config: PreprocessConfig, loop: str) -> dict:
    profile = get_profile("gpu" if args.device == "cuda" else "cpu", image_size=args.image_size,
                          batch_size=args.batch_size)
    dev, amp_dtype = _device_setup(args.device)
    workers = args.workers if args.workers is not None else default_workers(dev, _ctx())
    transform = TrainTransform(config, profile.aug_strength)
    dataset = CacheDataset(images, np.arange(len(images)), labels,
                           transform if loop == "current" else _FloatTransform(transform))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        **loader_options(dev, workers))
    torch.manual_seed(0)
    net, model, ema, criterion, optimizer, scheduler = build_training(profile, dev, None, int(labels.sum()),
                                                                      int(len(labels) - labels.sum()), 100)
    if loop == "main":
        ema = _main_ema(net, profile.ema_decay)
        optimizer = torch.optim.AdamW(net.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp_dtype == torch.float16)
    normalize = DeviceNormalize(config, dev)
    model.train()
    batches = _Cycle(loader)

    def to_input(x):
        if loop == "current":
            return normalize(x.to(dev, non_blocking=True))
        return x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def load_only():
        x, y = next(batches)
        to_input(x), y.to(dev, non_blocking=True)

    resident_x, resident_y = next(batches)
    resident_x, resident_y = to_input(resident_x), resident_y.to(dev)
    losses = []

    def step(x, y):
        loss = train_step(model, x, y, criterion, optimizer, scheduler, scaler, amp_dtype, dev)
        ema.update_parameters(net)
        if loop == "main":
            losses.append(float(loss))  # main read the loss every step: a device synchronisation
        else:
            losses.append(loss)

    def end_to_end():
        x, y = next(batches)
        step(to_input(x), y.to(dev, non_blocking=True))

    for _ in range(args.warmup):  # workers started, cuDNN autotuned, allocator warm
        end_to_end()
    result = {"loader": _timed(load_only, args.steps, args.batch_size, dev),
              "step": _timed(lambda: step(resident_x, resident_y), args.steps, args.batch_size, dev),
              "end_to_end": _timed(end_to_end, args.steps, args.batch_size, dev)}
    result = {k: round(v, 2) for k, v in result.items()}
    result["overhead"] = round(1 - result["end_to_end"] / result["step"], 3)
    result["workers"] = workers
    del loader, batches
    return result


def _ctx():
    from model.training import DistributedContext

    return DistributedContext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the training default)")
    parser.add_argument("--cache", help="a prepared cache at --image-size (default: random frames)")
    parser.add_argument("--images", type=int, default=2048, help="random frames to cycle through")
    parser.add_argument("--compare-main", action="store_true", help="also measure the loop as it was on main")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of current/main")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.cache:
        from model.data import CachedData

        cache = CachedData.load(args.cache)
        idx, labels = cache.split("train")
        images, config = np.asarray(cache.images[idx]), cache.config
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, args.image_size, args.image_size), dtype=np.uint8)
        labels = (np.arange(args.images) % 4 != 0).astype(np.int64)
        config = PreprocessConfig(image_size=args.image_size)
    if images.shape[-1] != args.image_size:
        parser.error(f"the cache holds {images.shape[-1]} px images, not --image-size {args.image_size}")
    rounds = []
    for _ in range(args.rounds):
        row = {"current": measure(args, images, labels, config, "current")}
        if args.compare_main:
            row["main"] = measure(args, images, labels, config, "main")
        rounds.append(row)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else (platform.processor() or platform.machine()))
    print(json.dumps({"device": args.device, "device_name": device_name, "image_size": args.image_size,
                      "batch_size": args.batch_size, "steps": args.steps, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "native_bf16": args.device == "cuda" or cpu_has_native_bf16(),
                      "load_average": os.getloadavg()[0], "rounds": rounds}))


if __name__ == "__main__":
    main()
