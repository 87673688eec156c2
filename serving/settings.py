"""Typed serving settings: environment variables (``PNEUMOSCOPE_*``) under command-line flags.

Every server entry point takes one flag per field (``model.settings_cli``), so the precedence is:
flag > environment variable > default, and a new setting is one line here. MLflow's own
``MLFLOW_TRACKING_URI`` is honoured. No torch, no kserve here: the CLI imports this module for ``--help``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.settings_cli import Cli

#: The KServe model name: the transformer forwards under its own name, so the predictor uses it too.
MODEL_NAME = "pneumonia"


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_", extra="ignore")

    model_name: str = Field(MODEL_NAME, description="KServe model name of both the transformer and the predictor")
    mlflow_tracking_uri: Annotated[str | None, Cli(aliases=("mlflow_uri",))] = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "PNEUMOSCOPE_MLFLOW_TRACKING_URI"),
        description="MLflow tracking/registry URI (default: local SQLite under PNEUMOSCOPE_HOME)")

    # --- inputs (transformer) ---
    # 16-bit CR/DX DICOM files are 10-30 MB (a 4,300 x 4,300 detector: 37 MB); the web app takes 32 MiB uploads and
    # the DICOM gateway 60 MB films. The decoders' own bounds (pixels, declared bytes) limit the work, not this.
    max_payload_bytes: int = Field(64_000_000, gt=0, description="largest request body (and gRPC message) accepted")
    max_image_pixels: int = Field(
        20_000_000, gt=0, description="largest width*height of one image, read from its header before decoding "
        "(real radiographs: up to about 4300x4300 = 18.5 Mpx; the shared data: at most 5.9 Mpx)")
    max_request_pixels: int = Field(60_000_000, gt=0, description="largest total width*height of all images of "
                                    "one request")
    max_dicom_bytes: int = Field(256 * 1024 * 1024, gt=0, description="largest DICOM pixel data as declared: Rows x "
                                 "Columns x frames x samples x bytes per sample")
    max_images_per_request: int = Field(32, gt=0, description="largest N of one request")
    decode_threads: int | None = Field(None, ge=1, description="images decoded at once (default: the CPUs the "
                                       "process may use); bounds decoding memory to about this many images")
    max_colourfulness: float = Field(
        12.0, ge=0, description="mean |R-G|+|G-B| above which an upload is a colour picture, not an X-ray "
        "(every real X-ray in the shared data measures 0)")
    min_mean_intensity: float = Field(
        30.0, ge=0, le=255, description="reject images whose mean intensity (0-255) is below this: black frames, "
        "inverted or failed exposures (every real X-ray in the shared data: 61-222)")
    max_mean_intensity: float = Field(240.0, ge=0, le=255, description="reject images whose mean intensity is above "
                                      "this: washed-out frames")
    min_contrast: float = Field(10.0, ge=0, description="reject near-uniform frames: pixel sd (0-255) below this "
                                "(real X-rays: at least 19.9)")
    heatmap_max_side: int = Field(512, ge=64, le=512, description="longest side of the rendered heatmap PNG (at "
                                  "most the decoded image's bound, 512)")

    # --- predictor link (transformer) ---
    predictor_protocol: Literal["grpc-v2", "v2"] = Field("grpc-v2", description="transformer -> predictor protocol")
    predictor_timeout_s: float = Field(30.0, gt=0, description="longest wait for one predictor call")

    # --- admission, deadlines, shutdown (both) ---
    max_inflight: int | None = Field(
        None, ge=1, description="hard bound on the inference requests one process holds at once (memory), whatever "
        "admission measures; default 64. Within it, admission follows the latency budget; more are refused at once "
        "with 503 + Retry-After (REST, before the body is read) or RESOURCE_EXHAUSTED (gRPC, before the message is "
        "parsed)")
    latency_budget_ms: float | None = Field(
        None, gt=0, description="the time from a request's arrival to its answer that admission keeps within: it "
        "admits as many requests as the measured service rate answers within it, and refuses the rest at once. "
        "It bounds the accepted requests' 99th percentile: the queue is kept as deep as the rate times the budget "
        "over the measured spread (p99 / mean) of the latencies. Default: the transformer uses twice the 99th "
        "percentile of its recent requests served alone (so that under overload an accepted request's p99 is "
        "about twice the unloaded one); the predictor, fed by "
        "transformers that bound their own queues, keeps a queue for batching and refuses only what would miss "
        "its deadline")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request that brings none (gRPC "
                                     "deadline, or the x-request-timeout-ms header, otherwise)")
    drain_timeout_s: Annotated[float, Cli(aliases=("drain_seconds",))] = Field(
        20.0, ge=0, description="on SIGTERM: readiness goes false, new requests get 503, and requests in flight "
        "get this long to finish (the manifests' terminationGracePeriodSeconds and preStop must cover it)")

    # --- engine (predictor) ---
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto", description="inference engine; auto: every installed engine is gated for accuracy and timed at load, "
        "the fastest eligible one serves")
    precision: Literal["auto", "fp32", "int8", "bf16"] = Field(
        "auto", description="auto: every precision the bundle allows (int8 when it passed its export gate; bf16 on "
        "OpenVINO where the CPU has native bf16), chosen with the engine")
    engine_timing_s: float = Field(
        0.5, ge=0, description="seconds of timing per engine x precision candidate at load (a ninth of it for one "
        "under half the fastest's rate after the first, screening round). Only the first replica on a kind of "
        "machine times (engine_choice); 0.5 s keeps it under 6 s from container start to ready on 2 cores, and "
        "tells apart candidates more than a few per cent apart (three interleaved rounds, median)")
    engine_choice: Literal["reuse", "refresh", "off"] = Field(
        "reuse", description="the engine choice per kind of machine (bundle digest, CPU model and flags, engine "
        "versions): reuse = a replica that finds a recorded choice for its key only gates it, one that times records "
        "its choice; refresh = time and overwrite the record; off = time at every start, record nothing. Kept as a "
        "tag of the served registry version (or engine_choice_model), else in engine_choice_dir, else nowhere")
    engine_choice_model: str | None = Field(
        None, description="models:/NAME/N whose tags keep the engine choice when the bundle comes from a folder "
        "(KServe's storageUri, a modelcar); it must hold the same bundle. Default: the served models:/ URI itself")
    engine_choice_dir: str | None = Field(
        None, description="a writable folder for the engine choice when no registry version keeps it (e.g. a "
        "volume the replicas share); default: none")
    threads: int | None = Field(None, ge=1, description="engine intra-op threads of one call (default: the CPUs the "
                                 "process may use: its CPU limit and affinity)")
    engine_streams: int | None = Field(
        None, ge=1, description="parallel single-threaded engine runs under load (default: = threads); a lone "
        "request still uses all threads. 1 = one engine run at a time with all threads")
    spinning: bool = Field(False, description="let ORT threads busy-wait between ops (steals CPU from the servers)")
    max_batch_size: int = Field(
        8, ge=1, description="dynamic batching: most images per engine call on one stream, or with a delay "
        "(side-by-side single-threaded streams take one request each: a batch gains nothing there)")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, description="dynamic batching: how long the first queued request may wait for company; "
        "0 = no waiting, batch whatever queued up while the engine was busy")
    model_cache: str | None = Field(None, description="where registry models are downloaded and kept (default: a "
                                    "temporary folder of the process, removed once the model is loaded; those of "
                                    "predictors killed while loading are removed at the next start)")
    model_wait_s: float = Field(60.0, ge=0, description="with MODEL_INIT_MODE=async (KServe's modelcar sidecar, which "
                                "links the model folder while the predictor starts): how long to wait for the folder")
    test_delay_ms: Annotated[float, Cli(env_only=True)] = Field(
        0.0, ge=0, description="TESTS ONLY: the predictor waits this long before each answer (makes one side of a "
        "local canary deliberately slower); never set it in production")
    model_sha256: Annotated[str | None, Cli(aliases=("sha256",))] = Field(
        None, description="expected bundle digest of the served model: required for a folder (e.g. KServe's "
        "/mnt/models), checked against the registry's bundle_sha256 tag for models:/ URIs")

    # --- process ---
    access_log: bool = Field(False, description="log every HTTP request")

    def engine_threads(self) -> int:
        """The engine's threads: ``threads``, else the CPUs this process may use (a pod's CPU limit and the
        affinity, not the node's count: 64 threads on a 2-CPU limit would thrash)."""
        from model.settings import available_cpus

        return self.threads or available_cpus()

    def streams(self) -> int:
        return self.engine_streams or self.engine_threads()

    def decoders(self) -> int:
        from model.settings import available_cpus

        return self.decode_threads or available_cpus()

    def inflight_limit(self) -> int:
        return self.max_inflight or 64

    def min_inflight(self) -> int:
        """Always admitted, whatever the estimate: the CPUs the process may use (at least 2), plus one. A request
        spends part of its time being decoded here and part in the engine, so keeping every core's engine
        stream busy takes one more request than there are streams: measured on 2 cores, 16 closed-loop clients
        through the stack, 2 in flight served 83 img/s, 3 served 91 (p99 33 and 51 ms), 6 served 94 (p99 115)."""
        from model.settings import available_cpus

        return min(self.inflight_limit(), max(2, available_cpus()) + 1)

    def admission(self, role: str):
        """The admission policy of one server process (``role``: transformer or predictor)."""
        from serving.admission import Admission

        budget = None if self.latency_budget_ms is None else self.latency_budget_ms / 1000.0
        return Admission(self.inflight_limit(), role, min_inflight=self.min_inflight(), latency_budget_s=budget,
                         auto_budget=role == "transformer")
