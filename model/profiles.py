"""Training profiles: named budgets. No torch here, so the CLI and the pipeline compiler stay fast."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Profile:
    """A named training budget. Every field can be overridden from the CLI or the pipeline."""

    name: str
    image_size: int
    epochs: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    patience: int = 4
    aug_strength: float = 1.0
    ema_decay: float = 0.998
    dropout: float = 0.2
    max_steps_per_epoch: int | None = None
    num_workers: int | None = None  # None: picked from the device and core count
    description: str = ""


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", image_size=64, epochs=1, batch_size=8, max_steps_per_epoch=3, patience=1,
                     description="a few steps at 64 px; for tests, seconds"),
    "demo": Profile("demo", image_size=96, epochs=2, batch_size=32, lr=1e-3, patience=2, ema_decay=0.99,
                    description="96 px, 2 epochs: about 10 minutes on 2 CPU cores; a demo, not a clinical model"),
    "cpu": Profile("cpu", image_size=128, epochs=8, batch_size=32, lr=1e-3, patience=3, ema_decay=0.995,
                   description="128 px, up to 8 epochs: the best a 2-core AVX2 CPU does in about an hour"),
    "gpu": Profile("gpu", image_size=224, epochs=30, batch_size=64, lr=5e-4, patience=6,
                   description="224 px, up to 30 epochs with early stopping on one GPU"),
}


def get_profile(name: str, **overrides) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(PROFILES[name], **changes)
