"""Typed serving settings: environment variables (``PNEUMOSCOPE_*``) under command-line flags.

Every server entry point builds its argparse defaults from :class:`ServingSettings`, so the
precedence is: flag > environment variable > default. MLflow's own ``MLFLOW_TRACKING_URI`` is
honoured. No torch, no kserve here: the CLI imports this module for ``--help``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The KServe model name: the transformer forwards under its own name, so the predictor uses it too.
MODEL_NAME = "pneumonia"


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_", extra="ignore")

    model_name: str = Field(MODEL_NAME, description="KServe model name of both the transformer and the predictor")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "PNEUMOSCOPE_MLFLOW_TRACKING_URI"),
        description="MLflow tracking/registry URI (default: local SQLite under PNEUMOSCOPE_HOME)")

    # --- inputs (transformer) ---
    max_payload_bytes: int = Field(20_000_000, gt=0, description="largest request body (and gRPC message) accepted")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest width*height decoded (bomb guard)")
    max_images_per_request: int = Field(32, gt=0, description="largest N of one request")
    max_colourfulness: float = Field(
        12.0, ge=0, description="mean |R-G|+|G-B| above which an upload is a colour picture, not an X-ray "
        "(every real X-ray in the shared data measures 0)")
    intensity_z_below: float = Field(
        4.5, gt=0, description="reject images darker than the training mean minus this many sd (real X-rays: "
        "mean intensity 61-222 of 255, at worst 3.4 sd below and 5.3 sd above the full training mean)")
    intensity_z_above: float = Field(6.0, gt=0, description="reject images brighter than the training mean plus "
                                     "this many sd")
    intensity_sd_floor: float = Field(
        20.0, gt=0, description="the sd used by the intensity gate is at least this (a small training subset "
        "underestimates it, and the gate must never reject a real X-ray)")
    min_contrast: float = Field(10.0, ge=0, description="reject near-uniform frames: pixel sd (0-255) below this "
                                "(real X-rays: at least 19.9)")
    heatmap_max_side: int = Field(512, ge=64, description="longest side of the rendered heatmap PNG")

    # --- predictor link (transformer) ---
    predictor_protocol: Literal["grpc-v2", "v2"] = Field("grpc-v2", description="transformer -> predictor protocol")
    predictor_timeout_s: float = Field(30.0, gt=0, description="deadline of one predictor call")

    # --- engine (predictor) ---
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto", description="inference engine; auto: every installed engine is gated for accuracy and timed at load, "
        "the fastest eligible one serves")
    precision: Literal["auto", "fp32", "int8", "bf16"] = Field(
        "auto", description="auto: every precision the bundle allows (int8 when it passed its export gate; bf16 on "
        "OpenVINO where the CPU has native bf16), chosen with the engine")
    engine_timing_s: float = Field(1.0, ge=0, description="seconds of timing per engine x precision candidate at load")
    threads: int | None = Field(None, ge=1, description="engine intra-op threads of one call (default: all cores)")
    engine_streams: int | None = Field(
        None, ge=1, description="parallel single-threaded engine runs under load (default: = threads); a lone "
        "request still uses all threads. 1 = one engine run at a time with all threads")
    spinning: bool = Field(False, description="let ORT threads busy-wait between ops (steals CPU from the servers)")
    max_batch_size: int = Field(8, ge=1, description="dynamic batching: most images per engine call")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, description="dynamic batching: how long the first queued request may wait for company; "
        "0 = no waiting, batch whatever queued up while the engine was busy")
    model_cache: str | None = Field(None, description="where registry models are downloaded (default: a temp dir)")

    # --- process ---
    access_log: bool = Field(False, description="log every HTTP request")

    def engine_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def streams(self) -> int:
        return self.engine_streams or self.engine_threads()
