"""Typed settings of ``pneumoscope rollout``: PNEUMOSCOPE_* environment variables under the CLI flags
(one flag per field, ``model.settings_cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.settings_cli import Cli


class RolloutSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_", extra="ignore")

    home: Path = Field(Path(".pneumoscope"), description="working folder; the local canary keeps its state here")
    namespace: str = Field("pneumoscope", description="namespace of the InferenceService")
    inference_service: Annotated[str, Cli(aliases=("name",))] = Field(
        "pneumonia", description="name of the InferenceService")
    kube_context: Annotated[str | None, Cli(aliases=("context",))] = Field(
        None, description="kubeconfig context (default: the current one, or the in-cluster service account)")
    kubeconfig: str | None = Field(None, validation_alias=AliasChoices("KUBECONFIG", "PNEUMOSCOPE_KUBECONFIG"),
                                   description="kubeconfig file (default: ~/.kube/config)")
    model_name: str = Field("pneumonia", description="registered model name in MLflow")
    mlflow_tracking_uri: Annotated[str | None, Cli(aliases=("mlflow_uri",))] = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "PNEUMOSCOPE_MLFLOW_TRACKING_URI"),
        description="MLflow tracking/registry URI (default: local SQLite under PNEUMOSCOPE_HOME)")
    prometheus_url: str = Field("http://127.0.0.1:9090", description="Prometheus HTTP API for analyze/status")
    timeout_s: Annotated[float, Cli(aliases=("timeout",))] = Field(
        600.0, gt=0, description="how long to wait for KServe to report the new traffic split")
    poll_s: float = Field(2.0, gt=0, description="how often to look at the InferenceService while waiting")

    # Analysis: the canary must not be worse than these (see rollout.analysis).
    analysis_window: Annotated[str, Cli(aliases=("window",))] = Field(
        "10m", pattern=r"^\d+[smh]$", description="Prometheus range of the comparison, e.g. 10m")
    max_error_ratio: float = Field(0.01, ge=0, le=1, description="largest 5xx ratio of the canary")
    max_error_ratio_increase: float = Field(0.005, ge=0, le=1, description="largest 5xx ratio above stable's")
    max_p99_seconds: float = Field(2.0, gt=0, description="the p99 latency target")
    max_p99_ratio: float = Field(1.5, gt=0, description="largest canary p99 / stable p99")
    max_rejection_ratio_increase: float = Field(0.05, ge=0, le=1, description="largest rejection ratio above stable's")
    max_share_difference: float = Field(0.15, ge=0, le=1, description="largest |PNEUMONIA share canary - stable|")
    alpha: float = Field(0.001, gt=0, lt=1, description="significance of the two-sample tests of the probabilities")
    min_requests: int = Field(50, ge=1, description="fewer canary requests than this: verdict 'inconclusive'")
