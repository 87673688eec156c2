"""Training profiles: named budgets. No torch here, so the CLI and the pipeline compiler stay fast."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Profile:
    """A named training budget. Every field can be overridden from the CLI or the pipeline."""

    name: str
    image_size: int
    epochs: int
    batch_size: int  # the GLOBAL batch: split across the processes under torchrun
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    patience: int = 4
    aug_strength: float = 1.0
    ema_decay: float = 0.998  # per step: halve the steps per epoch, square the decay to keep its horizon
    dropout: float = 0.2
    max_steps_per_epoch: int | None = None
    num_workers: int | None = None  # None: picked from the device and core count
    # Generalisation candidates (issue 9), all off by default: see BENCHMARKS.md, "Generalisation".
    erase_borders: float = 0.0  # probability of erasing random patches in the border band (markers, text)
    field_mask: str = "none"  # "ellipse": blank everything outside a fixed elliptical lung-field prior
    # "acquisition" (issue 17): adds what another machine or projection changes -- exposure curves, contrast,
    # detector blur and resolution, noise, crops and rescales, AP/PA-like geometry (model.transforms)
    augment: str = "standard"
    sync_bn: bool = False  # SyncBatchNorm across GPUs (CUDA only; needs small per-GPU batches to pay off)
    description: str = ""


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", image_size=64, epochs=1, batch_size=8, max_steps_per_epoch=3, patience=1,
                     description="a few steps at 64 px; for tests, seconds"),
    "demo": Profile("demo", image_size=96, epochs=2, batch_size=32, lr=1e-3, patience=2, ema_decay=0.99,
                    description="96 px, 2 epochs: about 10 minutes on 2 CPU cores; shows the machinery, "
                                "not a clinical model"),
    "cpu": Profile("cpu", image_size=128, epochs=8, batch_size=32, lr=1e-3, patience=3, ema_decay=0.995,
                   description="128 px, up to 8 epochs: about an hour on 2 CPU cores (fp32, or bf16 autocast "
                               "where the CPU has native bf16)"),
    # Batch 256 keeps the GPU busy (the step at batch 64 is launch-bound: 2,295 vs 4,560 img/s on an H200);
    # lr 1e-3 is the square-root scaling of 5e-4 at 64, the warm-up keeps ~30 steps, and the EMA decay
    # 0.992 = 0.998^4 keeps its horizon in epochs with 4x fewer steps per epoch.
    "gpu": Profile("gpu", image_size=224, epochs=30, batch_size=256, lr=1e-3, warmup_epochs=2.0, patience=6,
                   ema_decay=0.992,
                   description="224 px, batch 256, up to 30 epochs with early stopping on one or more GPUs"),
}

FIELD_MASKS = ("none", "ellipse")
AUGMENTS = ("standard", "acquisition")


def get_profile(name: str, **overrides) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return customise(PROFILES[name], **overrides)


def customise(base: Profile, **overrides) -> Profile:
    """``base`` with the overrides that are not None, checked."""
    known = {f.name for f in fields(Profile)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown profile field(s): {', '.join(sorted(unknown))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    profile = replace(base, **changes)
    if profile.field_mask not in FIELD_MASKS:
        raise ValueError(f"unknown field mask {profile.field_mask!r}; choose one of {', '.join(FIELD_MASKS)}")
    if profile.augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {profile.augment!r}; choose one of {', '.join(AUGMENTS)}")
    if not 0.0 <= profile.erase_borders <= 1.0:
        raise ValueError(f"erase_borders is a probability, not {profile.erase_borders}")
    return profile
