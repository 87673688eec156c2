"""ResNet-50 training on the preprocessed cache: profiles, EMA, early stopping, checkpoint + resume, torchrun.

Throughput (see BENCHMARKS.md): the loop never waits for the GPU inside a step. The DataLoader workers send
uint8 images (4x less shared memory and host-to-device traffic than float32) and the normalisation runs on the
device; the loss is summed on the device and read only when it is logged; the EMA is one multi-tensor
``torch._foreach_lerp_`` over all weights and buffers, with its step count kept in Python; AdamW is fused on
CUDA; the next epoch's first batches load while validation runs.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the network is wrapped in DistributedDataParallel and each
process takes its share of every global batch (``profile.batch_size`` is the GLOBAL batch, so the schedule,
steps per epoch and a resumed run do not depend on the number of processes). Only rank 0 logs, validates,
writes checkpoints and calls ``on_epoch`` (MLflow); the early-stopping decision is broadcast from it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.data import CachedData, DataError
from model.metrics import auc
from model.network import build_resnet50
from model.preprocessing import PreprocessConfig
from model.profiles import PROFILES, Profile, get_profile  # noqa: F401  (re-exported)
from model.settings import available_cpus

log = logging.getLogger(__name__)


class CacheDataset(Dataset):
    """(uint8 image [1, S, S], float label); ``transform.pixels`` augments (training) or passes through.

    Items by position ``i``, or by ``(epoch, i)`` from :class:`EpochSampler`: then the augmentation of image i
    in that epoch is seeded by (seed, epoch, i) alone."""

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
        pixels = self.transform.pixels(np.asarray(self.images[self.indices[i]]))
        # a copy: the cache is a read-only memory map, and the augmentations may hand it through unchanged
        return torch.from_numpy(np.array(pixels)[None]), torch.tensor(float(self.labels[i]))


class DeviceNormalize:
    """uint8 [N, 1, S, S] on the device -> the float32 network input: ``model.preprocessing.normalize`` done
    where the batch already is (same two float32 operations, so the same values)."""

    def __init__(self, config: PreprocessConfig, dev: torch.device):
        self.scale = torch.tensor(1.0 / (255.0 * config.std), dtype=torch.float32, device=dev)
        self.offset = torch.tensor(config.mean / config.std, dtype=torch.float32, device=dev)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.scale - self.offset).contiguous(memory_format=torch.channels_last)


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields ``(epoch, i)``. Its permutation depends on (seed, epoch) only and is the
    same for every world size (rank r takes every W-th position, so global batch k holds the same images under
    torchrun as in one process); with the epoch in the key, every augmentation depends on (seed, epoch, i) too.
    So a run resumed from ``last.pt`` repeats the uninterrupted one, with any number of loader workers."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_seed(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class WeightEma(nn.Module):
    """Exponential moving average of weights AND BatchNorm statistics; the decay ramps up,
    ``min(decay, (1 + n) / (10 + n))``, so that short runs are not dominated by the random initialisation.

    One ``torch._foreach_lerp_`` over every floating-point tensor per step (a handful of kernel launches on a
    GPU instead of ~320 Python-level ops), and the step count lives in Python so the update never waits for
    the device. ``state_dict()`` keeps ``AveragedModel``'s layout (``module.*`` + ``n_averaged``).
    """

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(net)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=_device_of(net)))
        self.steps = 0
        self._targets: list[list[torch.Tensor]] | None = None

    def _split(self, net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = [t.detach() for t in (*net.parameters(), *net.buffers())]
        return ([t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()])

    @torch.no_grad()
    def update_parameters(self, net: nn.Module) -> None:
        if self._targets is None:
            self._targets = list(self._split(self.module))
        floats, counters = self._split(net)
        if self.steps == 0:
            torch._foreach_copy_(self._targets[0], floats)
        else:
            decay = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
            torch._foreach_lerp_(self._targets[0], floats, 1.0 - decay)
        if counters:  # BatchNorm's num_batches_tracked: copied, not averaged
            torch._foreach_copy_(self._targets[1], counters)
        self.steps += 1
        self.n_averaged.fill_(self.steps)  # a device-side write; nothing waits for it

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.steps = int(self.n_averaged)  # once, at resume
        self._targets = None
        return result


def _device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict]
    best_epoch: int
    best_val_auc: float
    images_per_second: float
    seconds: float


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a ``torchrun`` job (world 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def distributed_context() -> DistributedContext:
    """Read torchrun's environment and join the process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as dist

    ctx = DistributedContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PNEUMOSCOPE_DIST_BACKEND") != "gloo" \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend)
    return ctx


def _device_setup(device: str | None, ctx: DistributedContext = DistributedContext()):
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(wanted)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", ctx.local_rank)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        threads = max(1, available_cpus() // max(1, _local_world_size(ctx)))
        torch.set_num_threads(threads)
        # bf16 autocast pays off only with native bf16 (AVX512-BF16 / AMX: ~2.5x fp32); on a CPU without it
        # bf16 is emulated and ~6x SLOWER than fp32, so fp32 + channels_last is used there.
        amp_dtype = torch.bfloat16 if cpu_has_native_bf16() else None
        if ctx.is_main:
            log.info("CPU capability %s, native bf16 %s: training in %s", torch.backends.cpu.get_cpu_capability(),
                     amp_dtype is not None, "bf16 autocast" if amp_dtype else "fp32 + channels_last")
    return dev, amp_dtype


def _local_world_size(ctx: DistributedContext) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 natively."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, dev: torch.device, amp_dtype,
                   normalize: DeviceNormalize) -> np.ndarray:
    net.eval()
    out = []
    for x, _ in loader:
        x = normalize(x.to(dev, non_blocking=True))
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(net(x).float().reshape(-1))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)  # one copy, one sync


def default_workers(dev: torch.device, ctx: DistributedContext) -> int:
    cpus = max(1, available_cpus() // max(1, _local_world_size(ctx)))
    # A GPU step at batch 256 eats ~4,500 img/s; one worker augments ~500-600 img/s at 224 px.
    return min(16, max(1, cpus - 1)) if dev.type == "cuda" else min(2, cpus)


def loader_options(dev: torch.device, workers: int) -> dict:
    options = dict(num_workers=workers, pin_memory=dev.type == "cuda", worker_init_fn=_worker_seed,
                   persistent_workers=workers > 0)
    if workers > 0:
        options["prefetch_factor"] = 4
    return options


def build_training(profile: Profile, dev: torch.device, pretrained: str | None, n_pos: int, n_neg: int,
                   steps_per_epoch: int, ctx: DistributedContext = DistributedContext()):
    """Network, EMA, loss, optimiser, schedule: everything one step needs (also used by the DDP test)."""
    net = build_resnet50(pretrained, dropout=profile.dropout)
    if profile.sync_bn:
        if dev.type != "cuda":
            raise ValueError("sync_bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only)")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(dev).to(memory_format=torch.channels_last)
    ema = WeightEma(net, profile.ema_decay) if ctx.is_main else None
    # pos_weight balances the ~3:1 PNEUMONIA:NORMAL ratio in the loss.
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / max(n_pos, 1), device=dev))
    optimizer = torch.optim.AdamW(net.parameters(), lr=profile.lr, weight_decay=profile.weight_decay,
                                  fused=dev.type == "cuda")
    total_steps = max(1, steps_per_epoch * profile.epochs)
    warmup = max(1, int(profile.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 1% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model = net
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    return net, model, ema, criterion, optimizer, scheduler


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion, optimizer, scheduler, scaler,
               amp_dtype, dev: torch.device) -> torch.Tensor:
    """One optimisation step on a normalised batch; returns the loss ON THE DEVICE (no synchronisation)."""
    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x).reshape(-1)
    loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def capped(profile: Profile) -> Profile:
    """``profile`` within the budget caps of the environment (PNEUMOSCOPE_MAX_EPOCHS, _MAX_STEPS_PER_EPOCH)."""
    from model.profiles import customise
    from model.settings import Settings

    settings = Settings()
    epochs = min(profile.epochs, settings.max_epochs) if settings.max_epochs else None
    steps = settings.max_steps_per_epoch
    if steps and profile.max_steps_per_epoch:
        steps = min(steps, profile.max_steps_per_epoch)
    result = customise(profile, epochs=epochs, max_steps_per_epoch=steps)
    if result != profile:
        log.info("budget caps from the environment: %d epochs, %s steps per epoch", result.epochs,
                 result.max_steps_per_epoch or "all")
    return result


@dataclass
class TrainState:
    """Where a run stands between epochs: what ``last.pt`` carries besides the weights and the optimiser."""

    start_epoch: int = 0
    best_auc: float = -1.0
    best_epoch: int = -1
    stale: int = 0  # epochs since the best
    history: list[dict] = field(default_factory=list)


@dataclass
class _Run:
    """Everything an epoch needs, built once by :func:`train`."""

    out: Path
    profile: Profile
    config: PreprocessConfig
    seed: int
    ctx: DistributedContext
    dev: torch.device
    amp_dtype: torch.dtype | None
    net: nn.Module  # the weights (``model`` is ``net``, or its DistributedDataParallel wrapper)
    model: nn.Module
    ema: WeightEma | None  # rank 0 only
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader | None  # rank 0 only
    val_y: np.ndarray
    normalize: DeviceNormalize
    steps_per_epoch: int

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"


@dataclass
class _Epoch:
    loss: float  # mean over the epoch's batches (over every process's under torchrun)
    n_batches: int
    started: float  # perf_counter at the start, validation included in the epoch's seconds
    train_seconds: float


def train(cache_dir: str | Path, out_dir: str | Path, profile: Profile, pretrained: str | None = None,
          seed: int = 42, resume: bool = True, device: str | None = None, log_every: int = 20,
          on_epoch=None, splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> TrainResult:
    """Train and write ``checkpoint.pt`` (best EMA weights + metadata), ``last.pt`` and ``history.json``.

    ``splits``: {"train": (indices, labels), "val": (indices, labels)} instead of the manifest's splits
    (used by k-fold cross-validation).
    """
    profile = capped(profile)
    run = _prepare_run(cache_dir, Path(out_dir), profile, pretrained, seed, device, splits)
    state = _resume(run) if resume and run.last_path.exists() else TrainState()
    if run.ctx.active:
        _broadcast_parameters(run.net)

    started = time.perf_counter()
    seen_images, train_seconds = 0, 0.0
    batches = None
    for epoch in range(state.start_epoch, profile.epochs):
        result = _train_epoch(run, epoch, batches, log_every)
        train_seconds += result.train_seconds
        seen_images += result.n_batches * profile.batch_size
        # Start the next epoch's loading now: with persistent workers its first batches arrive while the
        # EMA model is validated, so the next epoch does not begin by waiting for them.
        batches = None
        if epoch + 1 < profile.epochs:
            run.sampler.set_epoch(epoch + 1)
            batches = iter(run.train_loader)
        stop = _validate_and_checkpoint(run, state, epoch, result, on_epoch) if run.ctx.is_main else False
        if run.ctx.active:
            stop = _broadcast_flag(stop, run.dev)
        if stop:
            break
    return _finish(run, state, seen_images, train_seconds, started)


def _prepare_run(cache_dir: str | Path, out: Path, profile: Profile, pretrained: str | None, seed: int,
                 device: str | None, splits: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> _Run:
    """Check the inputs, seed, pick the device, build the loaders, the network and its optimiser."""
    ctx = distributed_context()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    else:  # one voice: rank 0 logs
        logging.getLogger("model").setLevel(logging.WARNING)
    cache = CachedData.load(cache_dir)
    config = replace(cache.config, field_mask=profile.field_mask)
    if config.image_size != profile.image_size:
        raise DataError(f"the cache holds {config.image_size} px images but profile {profile.name!r} trains at "
                        f"{profile.image_size} px; prepare the data with --image-size {profile.image_size}")
    if profile.batch_size % ctx.world_size:
        raise ValueError(f"the batch size {profile.batch_size} is the global batch; it must be divisible by the "
                         f"{ctx.world_size} processes")
    seed_everything(seed)
    dev, amp_dtype = _device_setup(device, ctx)
    train_idx, train_y = splits["train"] if splits else cache.split("train")
    val_idx, val_y = splits["val"] if splits else cache.split("val")
    if len(val_idx) == 0 or len(set(val_y.tolist())) < 2:
        raise DataError("the validation split needs both classes; prepare the data with a larger val fraction")

    workers = profile.num_workers if profile.num_workers is not None else default_workers(dev, ctx)
    options = loader_options(dev, workers)
    from model.transforms import EvalTransform, TrainTransform  # albumentations/cv2 only when training

    per_rank_batch = profile.batch_size // ctx.world_size
    train_set = CacheDataset(cache.images, train_idx, train_y,
                             TrainTransform(config, profile.aug_strength, erase_borders=profile.erase_borders,
                                            acquisition=profile.augment == "acquisition",
                                            seed=seed), seed)
    # Same permutation for every world size (seed + epoch): global step k sees the same images under
    # torchrun as in one process, and a resumed run continues the order it would have had.
    sampler = EpochSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                           drop_last=True)
    drop_last = len(train_idx) // ctx.world_size > per_rank_batch
    # Its own generator: each iter() draws the workers' base seed from it, not from the global RNG whose state
    # last.pt saves (the next epoch's iterator starts before the checkpoint, so a resumed run would diverge).
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(seed), **options)
    val_loader = None
    if ctx.is_main:
        val_loader = DataLoader(CacheDataset(cache.images, val_idx, val_y, EvalTransform(config)),
                                batch_size=max(64, per_rank_batch * 2), shuffle=False,
                                **loader_options(dev, min(workers, 4)))

    steps_per_epoch = len(train_loader) if profile.max_steps_per_epoch is None else \
        min(len(train_loader), profile.max_steps_per_epoch)
    n_pos, n_neg = int(train_y.sum()), int(len(train_y) - train_y.sum())
    net, model, ema, criterion, optimizer, scheduler = build_training(profile, dev, pretrained, n_pos, n_neg,
                                                                      steps_per_epoch, ctx)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp_dtype == torch.float16)
    if ctx.is_main:
        log.info("training ResNet-50 on %d images (%d pneumonia, %d normal), validating on %d; profile %s "
                 "(%d px, %d epochs, lr %g); device %s x %d, batch %d (%d per process), %d loader workers per "
                 "process, autocast %s, channels_last", len(train_idx), n_pos, n_neg, len(val_idx), profile.name,
                 profile.image_size, profile.epochs, profile.lr, dev.type, ctx.world_size, profile.batch_size,
                 per_rank_batch, workers,
                 str(amp_dtype).replace("torch.", "") if amp_dtype else "off (fp32)")
    return _Run(out, profile, config, seed, ctx, dev, amp_dtype, net, model, ema, criterion, optimizer, scheduler,
                scaler, sampler, train_loader, val_loader, val_y, DeviceNormalize(config, dev), steps_per_epoch)


def _resume(run: _Run) -> TrainState:
    """Weights, EMA, optimiser, schedule, RNG and bookkeeping from ``last.pt``: the run goes on where it stopped."""
    state = torch.load(run.last_path, map_location=run.dev, weights_only=False)
    run.net.load_state_dict(state["net"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    resumed = TrainState(start_epoch=state["epoch"] + 1, best_auc=state["best_auc"], best_epoch=state["best_epoch"],
                         stale=state["stale"], history=state["history"])
    if run.ctx.is_main:
        log.info("resumed from %s at epoch %d (best val AUC %.4f at epoch %d; it ran on %d process(es), this "
                 "run on %d)", run.last_path, resumed.start_epoch + 1, resumed.best_auc, resumed.best_epoch + 1,
                 state.get("world_size", 1), run.ctx.world_size)
    return resumed


def _train_epoch(run: _Run, epoch: int, batches, log_every: int) -> _Epoch:
    """One epoch of optimisation steps (``batches``: its iterator when already started, else None)."""
    from tqdm import tqdm

    profile, dev = run.profile, run.dev
    run.model.train()
    started = time.perf_counter()
    if batches is None:
        run.sampler.set_epoch(epoch)
        batches = iter(run.train_loader)
    loss_sum = torch.zeros((), device=dev)
    n_batches = 0
    steps = run.steps_per_epoch
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{profile.epochs}", unit="batch", mininterval=5,
               disable=None if run.ctx.is_main else True)
    report_every = max(1, steps // 5)
    for step in range(steps):
        x, y = next(batches)
        x = run.normalize(x.to(dev, non_blocking=True))
        y = y.to(dev, non_blocking=True)
        loss_sum += train_step(run.model, x, y, run.criterion, run.optimizer, run.scheduler, run.scaler,
                               run.amp_dtype, dev)
        if run.ema is not None:
            run.ema.update_parameters(run.net)
        n_batches += 1
        bar.update(1)
        if log_every and (step + 1) % log_every == 0 and not bar.disable:
            bar.set_postfix(loss=f"{float(loss_sum) / n_batches:.4f}")  # a sync, every log_every steps only
        if bar.disable and run.ctx.is_main and (step + 1) % report_every == 0:  # no TTY: progress as log lines
            log.info("epoch %d: %d/%d batches, loss %.4f, %.1f img/s", epoch + 1, step + 1, steps,
                     float(loss_sum) / n_batches, n_batches * profile.batch_size / (time.perf_counter() - started))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # the epoch's time includes its last kernels
    bar.close()
    train_seconds = time.perf_counter() - started
    if run.ctx.active:  # the mean loss over every process's batches
        import torch.distributed as dist

        dist.all_reduce(loss_sum)
        loss_sum /= run.ctx.world_size
    return _Epoch(float(loss_sum) / max(1, n_batches), n_batches, started, train_seconds)


def _validate_and_checkpoint(run: _Run, state: TrainState, epoch: int, result: _Epoch, on_epoch) -> bool:
    """Rank 0: score the EMA weights on val, keep them in ``checkpoint.pt`` when they are the best so far,
    write ``last.pt``, call ``on_epoch``. Returns whether to stop early."""
    val_logits = predict_logits(run.ema.module, run.val_loader, run.dev, run.amp_dtype, run.normalize)
    val_auc = auc(run.val_y, val_logits)
    val_loss = float(nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(val_logits), torch.from_numpy(run.val_y.astype(np.float32))))
    record = {"epoch": epoch + 1, "train_loss": result.loss, "val_auc": val_auc, "val_loss": val_loss,
              "lr": run.scheduler.get_last_lr()[0],
              "train_images_per_second": result.n_batches * run.profile.batch_size / max(result.train_seconds, 1e-9),
              "epoch_seconds": time.perf_counter() - result.started}
    state.history.append(record)
    improved = val_auc > state.best_auc
    if improved:
        state.best_auc, state.best_epoch, state.stale = val_auc, epoch, 0
        _save_checkpoint(run.out / "checkpoint.pt", run.ema.module, run.config, run.profile, run.seed, record)
    else:
        state.stale += 1
    log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f%s  %.1f img/s  %.0f s", epoch + 1,
             run.profile.epochs, record["train_loss"], val_loss, val_auc, " *" if improved else "",
             record["train_images_per_second"], record["epoch_seconds"])
    _atomic_save({"net": run.net.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
                  "scheduler": run.scheduler.state_dict(), "epoch": epoch, "best_auc": state.best_auc,
                  "best_epoch": state.best_epoch, "stale": state.stale, "history": state.history,
                  "rng": torch.get_rng_state(), "world_size": run.ctx.world_size}, run.last_path)
    if on_epoch:
        on_epoch(record)
    stop = state.stale >= run.profile.patience
    if stop:
        log.info("early stopping: val AUC has not improved for %d epochs", state.stale)
    return stop


def _finish(run: _Run, state: TrainState, seen_images: int, train_seconds: float, started: float) -> TrainResult:
    """Rank 0 writes ``history.json`` and ``result.json``; every rank returns the run's summary."""
    result = None
    if run.ctx.is_main:
        (run.out / "history.json").write_text(json.dumps(state.history, indent=2))
        throughput = seen_images / train_seconds if train_seconds else 0.0
        result = TrainResult(run.out / "checkpoint.pt", state.history, state.best_epoch + 1, state.best_auc,
                             throughput, time.perf_counter() - started)
        log.info("best val AUC %.4f at epoch %d; %.1f img/s; %.0f s", state.best_auc, state.best_epoch + 1, throughput,
                 result.seconds)
        (run.out / "result.json").write_text(json.dumps(dict(asdict(result), checkpoint=str(result.checkpoint),
                                                             world_size=run.ctx.world_size), indent=2))
    if run.ctx.active:
        import torch.distributed as dist

        dist.barrier()
    if result is None:  # other ranks: the same summary, nothing written
        result = TrainResult(run.out / "checkpoint.pt", [], 0, float("nan"), seen_images / max(train_seconds, 1e-9),
                             time.perf_counter() - started)
    return result


def launch(cache_dir: str | Path, out_dir: str | Path, profile: Profile, seed: int = 42, nproc: int = 1,
           pretrained: str | None = None) -> TrainResult:
    """``train`` in ``nproc`` processes on this node, one per GPU, through torchrun (``torch.distributed.run``);
    rank 0's result. ``nproc`` 1 trains in this process."""
    if nproc <= 1:
        return train(cache_dir, out_dir, profile, pretrained=pretrained, seed=seed)
    import subprocess
    import sys

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(asdict(profile)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "model.cli", "train", "--cache", str(cache_dir), "--out", str(out),
               "--profile-file", str(out / "profile.json"), "--seed", str(seed)]
    if pretrained:
        command += ["--pretrained", pretrained]
    log.info("launching %d training processes: %s", nproc, " ".join(command))
    subprocess.run(command, check=True)
    data = json.loads((out / "result.json").read_text())
    return TrainResult(Path(data["checkpoint"]), data["history"], data["best_epoch"], data["best_val_auc"],
                       data["images_per_second"], data["seconds"])


def _broadcast_parameters(net: nn.Module) -> None:
    """A resumed rank 0 (or any rank) makes every replica start from the same weights."""
    import torch.distributed as dist

    for tensor in (*net.parameters(), *net.buffers()):
        dist.broadcast(tensor.data, src=0)


def _broadcast_flag(flag: bool, dev: torch.device) -> bool:
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], device=dev if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(value, src=0)
    return bool(value.item())


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash never leaves a half-written file


def _save_checkpoint(path: Path, net: nn.Module, config: PreprocessConfig, profile: Profile, seed: int,
                     record: dict) -> None:
    _atomic_save({"state_dict": net.state_dict(), "preprocess": config.to_dict(), "profile": asdict(profile),
                  "seed": seed, "epoch": record["epoch"], "val_auc": record["val_auc"],
                  "arch": "resnet50-gray-1logit"}, path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    meta = torch.load(path, map_location="cpu", weights_only=False)
    net = build_resnet50(None, dropout=meta["profile"].get("dropout", 0.2), for_training=False)
    net.load_state_dict(meta["state_dict"])
    net.eval()
    return net, meta
