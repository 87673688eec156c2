"""The predictor: one immutable model version in ONNX Runtime behind kserve, batch-aware, no torch.

Open Inference Protocol v2 (REST or gRPC): input ``image`` FP32 [N,1,S,S] (already preprocessed by
the transformer), outputs ``logit`` FP32 [N] and ``cam`` FP32 [N,h,w]. Concurrent requests are
batched server-side (:mod:`serving.batching`). The model is ready only after a warm-up inference.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import InferRequest, InferResponse

from model.bundle import INPUT_NAME
from model.registry import fetch_model
from serving.batching import DynamicBatcher
from serving.engine_selection import select_engine
from serving.errors import RequestRejected
from serving.metrics import WARMUP_SECONDS, reject_count, set_model_info
from serving.protocol import tensor_output
from serving.settings import ServingSettings

log = logging.getLogger(__name__)


def _refuse(message: str) -> RequestRejected:
    reject_count("invalid_tensor")
    return RequestRejected("invalid_tensor", message)


class PneumoniaPredictor(Model):
    """kserve model serving one pinned pneumoscope bundle."""

    platform = "onnxruntime_onnx"

    def __init__(self, name: str, model_uri: str, settings: ServingSettings | None = None):
        super().__init__(name)
        self.model_uri = model_uri
        self.settings = settings or ServingSettings()
        self.bundle = None
        self.session = None
        self.batcher: DynamicBatcher | None = None
        self.model_version: str | None = None
        self.pinned_uri: str | None = None
        self.precision: str | None = None
        self.cam_shape: tuple[int, int] | None = None

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> bool:
        s = self.settings
        dest = s.model_cache or tempfile.mkdtemp(prefix="pneumoscope-predictor-")
        self.bundle, info = fetch_model(self.model_uri, dest, s.mlflow_tracking_uri)
        self.model_version, self.pinned_uri = str(info["version"]), info["uri"]
        # Engine x precision: gated for accuracy and timed on this machine (serving.engine_selection). Under
        # load, single-threaded runs go side by side on the narrow engine.
        self.engine = select_engine(self.bundle, s, self.name, self.model_version)
        self.precision, self.platform = self.engine.precision, self.engine.platform
        self.session, self.narrow = self.engine.wide, self.engine.narrow
        self.image_size = self.bundle.preprocess.image_size
        self.batcher = DynamicBatcher(self.run_narrow if self.narrow else self.run_engine, s.max_batch_size,
                                      s.max_batch_delay_ms / 1000.0, streams=s.streams(),
                                      run_wide=self.run_engine if self.narrow else None)
        self._warm_up()
        set_model_info(self.name, self.model_version, self.pinned_uri, self.bundle.sha256, "predictor", self.precision)
        log.info("predictor ready: %s (version %s, %s %s, %d threads, %d streams, batches of up to %d, delay %.1f ms)",
                 self.pinned_uri, self.model_version, self.engine.engine, self.precision, s.engine_threads(),
                 s.streams(), s.max_batch_size, s.max_batch_delay_ms)
        self.ready = True
        return self.ready

    def _warm_up(self) -> None:
        """Run the batch sizes we will see first, so the first client does not pay for allocation."""
        size, started = self.image_size, time.perf_counter()
        for n in sorted({1, self.settings.max_batch_size}):
            logits, cams = self.run_engine(np.zeros((n, 1, size, size), dtype=np.float32))
            if self.narrow is not None:
                self.run_narrow(np.zeros((n, 1, size, size), dtype=np.float32))
        if logits.shape != (n,) or cams.ndim != 3 or not np.all(np.isfinite(logits)):
            raise RuntimeError(f"warm-up inference returned logit {logits.shape}, cam {cams.shape}")
        self.cam_shape = tuple(int(d) for d in cams.shape[1:])
        WARMUP_SECONDS.set(time.perf_counter() - started)

    def run_engine(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All intra-op threads on one batch."""
        return self._run(self.session, x)

    def run_narrow(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One thread; several of these run in parallel under load."""
        return self._run(self.narrow, x)

    @staticmethod
    def _run(session, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return session.run(x)

    def stop(self):
        if self.batcher:
            self.batcher.close()
        super().stop()

    # -- metadata ------------------------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        s = getattr(self, "image_size", -1)
        return [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 1, s, s]}]

    def get_output_types(self) -> list[dict]:
        h, w = self.cam_shape or (-1, -1)
        return [{"name": "logit", "datatype": "FP32", "shape": [-1]},
                {"name": "cam", "datatype": "FP32", "shape": [-1, h, w]}]

    # -- inference -----------------------------------------------------------------------------
    def _tensor(self, request: InferRequest) -> np.ndarray:
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
            names = [i.name for i in request.inputs]
            raise _refuse(f"expected one input named {INPUT_NAME!r}, got {names}")
        tensor = request.inputs[0]
        size = self.image_size
        if tensor.datatype != "FP32":
            raise _refuse(f"input {INPUT_NAME!r} must be FP32, not {tensor.datatype}")
        shape = list(tensor.shape)
        limit = max(self.settings.max_images_per_request, self.settings.max_batch_size)
        if len(shape) != 4 or shape[1:] != [1, size, size] or not 1 <= int(shape[0]) <= limit:
            raise _refuse(f"input {INPUT_NAME!r} must have shape [N,1,{size},{size}] with 1 <= N <= {limit}, "
                          f"got {shape}")
        count = int(np.prod(shape))
        raw = getattr(tensor, "_raw_data", None)
        try:
            if raw is not None:
                if len(raw) != count * 4:
                    raise _refuse(f"input {INPUT_NAME!r}: {len(raw)} bytes do not hold FP32 {shape}")
                x = np.frombuffer(raw, dtype=np.float32).reshape(shape)
            else:
                x = np.asarray(tensor.data, dtype=np.float32)
                if x.size != count:
                    raise _refuse(f"input {INPUT_NAME!r}: {x.size} values do not fill shape {shape}")
                x = x.reshape(shape)
        except (TypeError, ValueError) as exc:
            raise _refuse(f"input {INPUT_NAME!r} is not numeric FP32 data: {exc}") from None
        if not np.isfinite(x).all():
            raise _refuse(f"input {INPUT_NAME!r} contains NaN or infinity")
        return x

    async def predict(self, payload, headers=None, response_headers=None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise _refuse("the predictor speaks Open Inference Protocol v2 (REST /v2/... or gRPC) only")
        x = self._tensor(payload)
        logits, cams = await self.batcher.submit(x)
        outputs = [tensor_output("logit", "FP32", logits), tensor_output("cam", "FP32", cams)]
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.model_version, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)
