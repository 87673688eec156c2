"""The transformer: encoded X-ray in, calibrated probability (and heatmap) out; no torch.

Requests (model name ``pneumonia``):

- REST v1 ``/v1/models/pneumonia:predict`` / ``:explain`` with ``{"instances": [{"image": {"b64": ...}}]}``
  (``:explain`` adds ``heatmap_png``; so does ``"parameters": {"heatmap": true}`` on ``:predict``).
  A raw ``image/*`` or ``application/dicom`` body is one image too.
- Open Inference Protocol v2 (REST ``/v2/models/pneumonia/infer`` or gRPC): input ``image`` BYTES [N],
  one encoded file per element (raw bytes, or base64 text in JSON). Outputs ``probability`` FP32 [N],
  ``label`` BYTES [N], ``threshold`` FP32 [N]; with the request parameter ``heatmap: true`` also
  ``heatmap_png`` BYTES [N] (base64 text of a PNG) and ``cam`` FP32 [N,h,w] (ReLU'd, scaled to [0, 1]).
  ``quality_flags`` BYTES [N]: per image a JSON list, e.g. ``["blurred", "text_overlay"]`` (v1: a list per
  prediction) from :mod:`model.quality`; reported beside the answer, never part of it.

Decoding is ``model.preprocessing`` (the training code path) plus the X-ray gate of
:mod:`serving.inputs`; the tensor goes to the predictor over gRPC v2 (default) or REST v2.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import (InferInput, InferRequest, InferResponse, deserialize_bytes_tensor,
                                        to_http_parameters)

from model.quality import quality_flags
from model.registry import fetch_model
from serving import heatmap as heatmaps
from serving.errors import PredictorUnavailable, RequestRejected
from serving.inputs import PreparedImage, display_pixels, element_bytes, prepare_image, reject
from serving.metrics import PREDICTIONS, PREDICTOR_ERRORS, PROBABILITY, set_model_info
from serving.predictor_client import PredictorClient
from serving.protocol import tensor_output
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

LABELS = ("NORMAL", "PNEUMONIA")
INPUT = "image"
OUTPUTS = ("probability", "label", "threshold", "heatmap_png", "cam", "quality_flags")
#: Decode in a worker thread above this many bytes, so large uploads do not stall the event loop.
INLINE_DECODE_BYTES = 256 * 1024
_RAW_IMAGE_TYPES = ("image/", "application/dicom")


@dataclass
class Prepared:
    protocol: str  # "v1" or "v2"
    images: list[PreparedImage]
    tensor: np.ndarray
    heatmap: bool
    request: InferRequest | None = None
    quality: list[list[str]] = field(default_factory=list)  # flags per image; they never change the decision


@dataclass
class Scored:
    prepared: Prepared
    logits: np.ndarray
    cams: np.ndarray


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class PneumoniaTransformer(Model):
    def __init__(self, name: str, model_uri: str, predictor_host: str, protocol: str = "grpc-v2",
                 settings: ServingSettings | None = None):
        super().__init__(name)
        self.model_uri = model_uri
        self.settings = settings or ServingSettings()
        self.predictor_host = predictor_host
        self.protocol = protocol
        self.bundle = None
        self.model_version: str | None = None
        self.client: PredictorClient | None = None

    def load(self) -> bool:
        s = self.settings
        dest = s.model_cache or tempfile.mkdtemp(prefix="pneumoscope-transformer-")
        self.bundle, info = fetch_model(self.model_uri, dest, s.mlflow_tracking_uri)
        self.model_version, self.pinned_uri = str(info["version"]), info["uri"]
        self.config = self.bundle.preprocess
        self.threshold = self.bundle.threshold
        self.client = PredictorClient(self.predictor_host, self.protocol, self.name, s.predictor_timeout_s)
        set_model_info(self.name, self.model_version, self.pinned_uri, self.bundle.sha256, "transformer")
        log.info("transformer ready: %s (version %s), %d px, threshold %.4f, predictor %s over %s",
                 self.pinned_uri, self.model_version, self.config.image_size, self.threshold, self.predictor_host,
                 self.protocol)
        self.ready = True
        return True

    def validate(self, payload):
        return payload  # preprocess already validated; kserve's check assumes dict payloads

    # -- metadata (GET /v2/models/pneumonia) -------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probability", "datatype": "FP32", "shape": [-1]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "threshold", "datatype": "FP32", "shape": [-1]},
                {"name": "heatmap_png", "datatype": "BYTES", "shape": [-1]},
                {"name": "cam", "datatype": "FP32", "shape": [-1, -1, -1]},
                {"name": "quality_flags", "datatype": "BYTES", "shape": [-1]}]

    # -- preprocess --------------------------------------------------------------------------------
    async def preprocess(self, payload, headers=None) -> Prepared:
        if isinstance(payload, InferRequest):
            encoded, heatmap = self._v2_elements(payload)
            protocol, request = "v2", payload
        elif isinstance(payload, dict):
            encoded, heatmap = self._v1_elements(payload)
            protocol, request = "v1", None
        elif isinstance(payload, (bytes, bytearray)) and (headers or {}).get("content-type", "").startswith(
                _RAW_IMAGE_TYPES):
            encoded, heatmap, protocol, request = [bytes(payload)], False, "v1", None
            if not encoded[0]:
                raise reject("empty", "the request body is empty")
        else:
            raise reject("invalid_request", 'send JSON {"instances": [{"image": {"b64": "..."}}]} (v1) or a v2 '
                                            "inference request")
        if sum(len(e) for e in encoded) > INLINE_DECODE_BYTES:
            images = await asyncio.to_thread(self._decode_all, encoded)
        else:
            images = self._decode_all(encoded)
        tensor = self._normalize(np.stack([im.pixels for im in images]))
        flags = await asyncio.to_thread(self._quality_flags, images)
        return Prepared(protocol, images, tensor, heatmap, request, flags)

    def _quality_flags(self, images: list[PreparedImage]) -> list[list[str]]:
        # Measured at the quality module's own resolution, on the display decode (>= the model's size).
        return [quality_flags(display_pixels(img, self.config, self.settings)) for img in images]

    def _decode_all(self, encoded: list[bytes]) -> list[PreparedImage]:
        many = len(encoded) > 1
        return [prepare_image(data, self.config, self.settings, f"image {i}" if many else "the image")
                for i, data in enumerate(encoded)]

    def _normalize(self, pixels: np.ndarray) -> np.ndarray:
        from model.preprocessing import normalize

        return np.ascontiguousarray(normalize(pixels, self.config))

    def _check_count(self, n: int) -> None:
        if n < 1:
            raise reject("invalid_request", "the request holds no image")
        if n > self.settings.max_images_per_request:
            raise reject("too_many_images", f"{n} images in one request; at most "
                                            f"{self.settings.max_images_per_request}", 413)

    def _v1_elements(self, payload: dict) -> tuple[list[bytes], bool]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise reject("invalid_request", 'the v1 body needs an "instances" list')
        self._check_count(len(instances))
        parameters = payload.get("parameters") or {}
        heatmap = isinstance(parameters, dict) and _truthy(parameters.get("heatmap", False))
        encoded = []
        for i, instance in enumerate(instances):
            where = f"instances[{i}]"
            value = instance.get("image") if isinstance(instance, dict) else None
            if isinstance(value, dict):
                value = value.get("b64")
            if not isinstance(value, str):
                raise reject("invalid_request", f'{where} must be {{"image": {{"b64": "<base64 of a JPEG, PNG or '
                                                f'DICOM file>"}}}}')
            encoded.append(element_bytes(value, f"{where}.image.b64"))
            if isinstance(instance, dict) and _truthy(instance.get("heatmap", False)):
                heatmap = True
        return encoded, heatmap

    def _v2_elements(self, request: InferRequest) -> tuple[list[bytes], bool]:
        parameters = to_http_parameters(request.parameters) if request.parameters else {}
        heatmap = _truthy(parameters.get("heatmap", False))
        for wanted in request.request_outputs or []:
            if wanted.name not in OUTPUTS:
                raise reject("invalid_request", f"unknown output {wanted.name!r}; this model returns {list(OUTPUTS)}")
            heatmap = heatmap or wanted.name in ("heatmap_png", "cam")
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            raise reject("invalid_tensor", f"expected exactly one input named {INPUT!r}, got "
                                           f"{[i.name for i in request.inputs]}")
        tensor: InferInput = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise reject("invalid_tensor", f"input {INPUT!r} must be BYTES (one encoded file per element), "
                                           f"not {tensor.datatype}")
        shape = list(tensor.shape or [])
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
            raise reject("invalid_tensor", f"input {INPUT!r} must have shape [N] with N >= 1, got {shape}")
        raw = getattr(tensor, "_raw_data", None)
        if raw is not None:
            try:
                elements = list(deserialize_bytes_tensor(raw))
            except Exception:
                raise reject("invalid_tensor", f"input {INPUT!r}: the binary BYTES data is malformed") from None
        else:
            elements = tensor.data if isinstance(tensor.data, list) else None
            if elements is None:
                raise reject("invalid_tensor", f"input {INPUT!r} has no data")
        if len(elements) != shape[0]:
            raise reject("invalid_tensor", f"input {INPUT!r} has shape {shape} but {len(elements)} elements")
        self._check_count(len(elements))
        return [element_bytes(v, f"{INPUT}[{i}]") for i, v in enumerate(elements)], heatmap

    # -- predict / explain ------------------------------------------------------------------------
    async def predict(self, prepared: Prepared, headers=None, response_headers=None) -> Scored:
        try:
            logits, cams, version = await self.client.infer(prepared.tensor, headers)
        except PredictorUnavailable as exc:
            PREDICTOR_ERRORS.labels(cause="unavailable").inc()
            raise exc
        except RequestRejected:
            PREDICTOR_ERRORS.labels(cause="refused").inc()
            raise
        n = len(prepared.tensor)
        if logits.shape != (n,) or cams.ndim != 3 or len(cams) != n:
            PREDICTOR_ERRORS.labels(cause="bad_response").inc()
            raise PredictorUnavailable(self.name, f"unexpected predictor outputs: logit {logits.shape}, "
                                                  f"cam {cams.shape}")
        if version and version != self.model_version:
            PREDICTOR_ERRORS.labels(cause="version_mismatch").inc()
            raise PredictorUnavailable(self.name, f"the predictor serves version {version}, this transformer "
                                                  f"preprocesses for version {self.model_version}")
        return Scored(prepared, logits, cams)

    async def explain(self, prepared: Prepared, headers=None) -> Scored:
        prepared.heatmap = True
        return await self.predict(prepared, headers)

    # -- postprocess -------------------------------------------------------------------------------
    async def postprocess(self, scored: Scored, headers=None, response_headers=None):
        prepared = scored.prepared
        probs = self.bundle.probability(scored.logits).astype(np.float32)
        positive = probs >= self.threshold
        labels = [LABELS[int(p)] for p in positive]
        for p, label in zip(probs, labels):
            PREDICTIONS.labels(model_name=self.name, label=label).inc()
            PROBABILITY.labels(model_name=self.name).observe(float(p))
        pngs = cams = None
        if prepared.heatmap:
            pngs = await asyncio.to_thread(self._render, prepared.images, scored.cams)
            cams = np.stack([heatmaps.normalise_cam(c) for c in scored.cams]).astype(np.float32)
        if prepared.protocol == "v1":
            predictions = []
            for i, (p, label) in enumerate(zip(probs, labels)):
                item = {"probability": float(p), "label": label, "threshold": self.threshold,
                        "model_name": self.name, "model_version": self.model_version,
                        "quality_flags": prepared.quality[i]}
                if pngs is not None:
                    item["heatmap_png"] = pngs[i]
                predictions.append(item)
            return {"predictions": predictions}
        outputs = [tensor_output("probability", "FP32", probs),
                   tensor_output("label", "BYTES", np.array(labels, dtype=np.object_)),
                   tensor_output("threshold", "FP32", np.full(len(probs), self.threshold, dtype=np.float32))]
        if pngs is not None:
            outputs.append(tensor_output("heatmap_png", "BYTES", np.array(pngs, dtype=np.object_)))
            outputs.append(tensor_output("cam", "FP32", cams))
        outputs.append(tensor_output("quality_flags", "BYTES",
                                     np.array([json.dumps(f) for f in prepared.quality], dtype=np.object_)))
        request = prepared.request
        return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.model_version, infer_outputs=outputs,
                             use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs)

    def _render(self, images: list[PreparedImage], cams: np.ndarray) -> list[str]:
        return [base64.b64encode(heatmaps.render_overlay(display_pixels(img, self.config, self.settings), cam,
                                                         self.settings.heatmap_max_side)).decode("ascii")
                for img, cam in zip(images, cams)]

