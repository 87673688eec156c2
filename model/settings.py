"""Typed settings for the training side: environment variables (PNEUMOSCOPE_*) under CLI flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray_224"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_", extra="ignore")

    home: Path = Field(Path(".pneumoscope"), description="working folder: caches, runs, the local MLflow store")
    data: str | None = Field(None, description="data folder or URL; default ../shared/data/chest_xray_224")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "PNEUMOSCOPE_MLFLOW_TRACKING_URI"),
        description="MLflow tracking/registry URI; default sqlite under home")
    model_name: str = Field("pneumonia", description="registered model name in MLflow")
    profile: str = Field("demo", description="training budget (model.profiles): smoke, demo, cpu or gpu")
    seed: int = Field(42, description="random seed of training (weights, augmentations, order) and of a pipeline run")
    workers: int | None = Field(None, description="data prepare: decode processes; train: DataLoader workers per "
                                                  "process (default: from the cores)")
    # Budget caps for checks that only need the machinery to run (CI, the documentation's own commands):
    # they shorten any profile, never lengthen it. Unset in normal use.
    max_epochs: int | None = Field(None, ge=1,
                                   description="cap on the epochs of any profile (PNEUMOSCOPE_MAX_EPOCHS)")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="cap on the optimisation steps of one epoch (PNEUMOSCOPE_MAX_STEPS_PER_EPOCH)")

    age_limit_years: float = Field(
        18.0, gt=0, le=150, description="evaluation: the oldest patient age (years) within the exported model's "
        "intended use, recorded in the bundle; an older patient's film (DICOM Patient's Age or the request's "
        "patient_age) is answered REFER")

    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        home = self.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'mlflow.db'}"


def available_cpus() -> int:
    """CPUs this process may use: the cgroup quota (a pod's CPU limit) and affinity, not the node's count."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)
