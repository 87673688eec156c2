"""The transformer: encoded X-ray in, the predictor's answer (and a heatmap) out; no model version, no torch.

Requests (model name ``pneumonia``):

- REST v1 ``/v1/models/pneumonia:predict`` / ``:explain`` with ``{"instances": [{"image": {"b64": ...}}]}``
  (``:explain`` adds ``heatmap_png``; so does ``"parameters": {"heatmap": true}`` on ``:predict``).
  A raw ``image/*`` or ``application/dicom`` body is one image too.
- Open Inference Protocol v2 (REST ``/v2/models/pneumonia/infer`` or gRPC): input ``image`` BYTES [N],
  one encoded file per element (raw bytes, or base64 text in JSON). Outputs ``probability`` FP32 [N],
  ``label`` BYTES [N], ``threshold`` FP32 [N], ``decision`` BYTES [N] (PNEUMONIA | NORMAL | REFER),
  ``ood_score`` FP32 [N], ``in_intended_use`` BOOL [N], ``refer_reasons`` BYTES [N] (per image a JSON list of
  ``{"code", "text"}``); the response parameter ``intended_use`` (JSON) describes the version that answered.
  With the request parameter ``heatmap: true`` also ``heatmap_png`` BYTES [N] (base64 text of a PNG) and
  ``cam`` FP32 [N,h,w] (ReLU'd, scaled to [0, 1]). ``quality_flags`` BYTES [N]: per image a JSON list, e.g.
  ``["blurred", "text_overlay"]`` (v1: a list per prediction) from :mod:`model.quality`; reported beside the
  answer, never part of it. v1 predictions carry the same fields, with ``ood_score`` null where the version has
  no detector, and the response's ``intended_use`` object.

The patient's age: a DICOM file's Patient's Age (0010,1010), read from the header before anything else, or
the request parameter ``patient_age`` (years, or a DICOM age string like ``045Y``; v1: ``parameters`` or per
instance), which wins. It travels to the predictor, whose version applies its own age limit; it is never logged.

The view: a DICOM file whose View Position (0018,5101), or else its View Code Sequence, names a lateral, decubitus
or oblique view (``model.dicom.header_view``) is answered REFER, ``in_intended_use`` false, with the reason
``view_not_frontal`` added here, whatever version answered (every version reads frontal films only); the
probability is still the version's. A file that names no view, and every JPEG or PNG, is taken as the frontal film
the caller sends.

``intended_use`` and ``model_sha256`` (the served bundle's digest, when the predictor names it) are response
parameters (v1: fields of the response and of each prediction respectively).
Where the evidence falls: ``lung_share`` FP32 [N]: the share of the positive CAM mass inside the lungs (-1: no positive mass), with
  ``lung_mask_source`` BYTES [N] (``segmentation`` or ``ellipse_prior``); with ``heatmap: true`` also
  ``lung_mask`` UINT8 [N,128,128] (1 on the lungs, the film squashed to a square) and ``input_box`` FP32 [N,4]
  (top, left, bottom, right fractions: the part of the film the CAM covers). Passed through from the predictor.

The transformer is version-agnostic: it runs stage 1 of ``model.preprocessing`` (decode to bounded
grayscale, with bounded cost) and the X-ray gate of :mod:`serving.inputs`, sends the pixels of all
images of a request to the predictor in ONE call, and passes the predictor's answer through --
probability, label, threshold and ``model_version`` all come from the one version the predictor
serves. The heatmap is drawn from the predictor's CAM over the pixels already decoded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, to_http_parameters

from model.intended_use import REFER, InvalidAge, parse_age, view_reason
from model.preprocessing import declared_pixels
from model.quality import quality_flags
from model.wire_format import WireFormatError, decode_bytes_elements
from serving import heatmap as heatmaps
from serving.inputs import PreparedImage, decode_upload, element_bytes, reject
from serving.metrics import REFER_REASONS
from serving.predictor_client import Answer, PredictorClient
from serving.protocol import INTENDED_USE_PARAMETER, MODEL_DIGEST_PARAMETER, tensor_output
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

INPUT = "image"
OUTPUTS = ("probability", "label", "threshold", "heatmap_png", "cam", "quality_flags", "decision", "ood_score",
           "in_intended_use", "refer_reasons", "lung_share", "lung_mask_source", "lung_mask", "input_box")
#: The request parameter (v1: also per instance) giving the patient's age: years, or a DICOM age string.
AGE_PARAMETER = "patient_age"
_RAW_IMAGE_TYPES = ("image/", "application/dicom")
#: A request this small (encoded bytes, and decoded pixels of all its images) is decoded on the event loop: a
#: 224 px film decodes and is assessed in about 1 ms, less than the two thread hops to the decode pool cost
#: under load (context switches were a tenth of the transformer's CPU at 16 clients). Larger ones, full-size
#: films above all, are decoded in the pool, off the loop.
INLINE_MAX_BYTES = 256 * 1024
INLINE_MAX_PIXELS = 320 * 320


@dataclass
class Prepared:
    protocol: str  # "v1" or "v2"
    images: list[PreparedImage]
    heatmap: bool
    request: InferRequest | None = None
    quality: list[list[str]] = field(default_factory=list)  # flags per image; they never change the decision
    ages: list[float | None] = field(default_factory=list)  # the client's patient_age per image (None: not given)

    def patient_ages(self) -> list[float | None]:
        """Each image's age in years: the client's, else its DICOM header's, else None."""
        given = self.ages or [None] * len(self.images)
        return [a if a is not None else image.age_years for a, image in zip(given, self.images)]


@dataclass
class Scored:
    prepared: Prepared
    answer: Answer


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value is True or (isinstance(value, int) and not isinstance(value, bool) and value == 1)


def _age(value, where: str) -> float | None:
    try:
        return parse_age(value)
    except InvalidAge as exc:
        raise reject("invalid_request", f"{where}: {exc}") from None


class PneumoniaTransformer(Model):
    def __init__(self, name: str, predictor_host: str, protocol: str = "grpc-v2",
                 settings: ServingSettings | None = None):
        super().__init__(name)
        self.settings = settings or ServingSettings()
        self.predictor_host = predictor_host
        self.protocol = protocol
        self.client: PredictorClient | None = None
        self.decoders: ThreadPoolExecutor | None = None

    def load(self) -> bool:
        s = self.settings
        self.client = PredictorClient(self.predictor_host, self.protocol, self.name, s.predictor_timeout_s,
                                      s.max_images_per_request)
        # Decoding runs here, off the event loop; the pool's size bounds decoding memory and CPU.
        self.decoders = ThreadPoolExecutor(max_workers=s.decoders(), thread_name_prefix="decode")
        log.info("transformer ready: predictor %s over %s (any model version), %d decode threads, admission within "
                 "a latency budget (%s), %d to %d requests in flight", self.predictor_host, self.protocol, s.decoders(),
                 f"{s.latency_budget_ms:.0f} ms" if s.latency_budget_ms else "2x the unloaded p99",
                 s.min_inflight(), s.inflight_limit())
        self.ready = True
        return True

    def stop(self):
        if self.decoders is not None:
            self.decoders.shutdown(wait=False, cancel_futures=True)
        super().stop()

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
                {"name": "quality_flags", "datatype": "BYTES", "shape": [-1]},
                {"name": "decision", "datatype": "BYTES", "shape": [-1]},
                {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
                {"name": "in_intended_use", "datatype": "BOOL", "shape": [-1]},
                {"name": "refer_reasons", "datatype": "BYTES", "shape": [-1]},
                {"name": "lung_share", "datatype": "FP32", "shape": [-1]},
                {"name": "lung_mask_source", "datatype": "BYTES", "shape": [-1]},
                {"name": "lung_mask", "datatype": "UINT8", "shape": [-1, 128, 128]},
                {"name": "input_box", "datatype": "FP32", "shape": [-1, 4]}]

    # -- request checks before kserve copies a gRPC request ----------------------------------------
    def precheck_grpc(self, request) -> None:
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            raise reject("invalid_tensor", f"expected exactly one input named {INPUT!r}, got "
                                           f"{[i.name for i in request.inputs][:4]}")
        contents = request.inputs[0].contents
        typed = (len(contents.uint_contents) + len(contents.int_contents) + len(contents.fp32_contents) +
                 len(contents.int64_contents) + len(contents.uint64_contents) + len(contents.fp64_contents) +
                 len(contents.bool_contents))
        if typed:
            raise reject("invalid_tensor", f"input {INPUT!r} must be BYTES (one encoded file per element)")
        self._check_count(len(contents.bytes_contents) or 1)
        if len(request.raw_input_contents) > 1:
            raise reject("invalid_tensor", f"{len(request.raw_input_contents)} raw inputs for one input")

    # -- preprocess --------------------------------------------------------------------------------
    async def preprocess(self, payload, headers=None) -> Prepared:
        if isinstance(payload, InferRequest):
            encoded, heatmap, ages = self._v2_elements(payload)
            protocol, request = "v2", payload
        elif isinstance(payload, dict):
            encoded, heatmap, ages = self._v1_elements(payload)
            protocol, request = "v1", None
        elif isinstance(payload, (bytes, bytearray)) and str((headers or {}).get("content-type", "")).startswith(
                _RAW_IMAGE_TYPES):
            encoded, heatmap, protocol, request, ages = [bytes(payload)], False, "v1", None, []
            if not encoded[0]:
                raise reject("empty", "the request body is empty")
        else:
            raise reject("invalid_request", 'send JSON {"instances": [{"image": {"b64": "..."}}]} (v1) or a v2 '
                                            "inference request")
        loop = asyncio.get_running_loop()
        small = sum(len(e) for e in encoded) <= INLINE_MAX_BYTES
        if small:  # a header of a small file: cheaper here than a hop to the decode pool and back
            total = sum(declared_pixels(e) for e in encoded)
        else:
            total = sum(await loop.run_in_executor(self.decoders, lambda: [declared_pixels(e) for e in encoded]))
        if total > self.settings.max_request_pixels:
            raise reject("too_large", f"the request's images hold {total} pixels together; at most "
                                      f"{self.settings.max_request_pixels} are accepted")
        names = [f"image {i}" for i in range(len(encoded))] if len(encoded) > 1 else ["the image"]
        if small and total <= INLINE_MAX_PIXELS:
            assessed = [self._decode_and_assess(data, where) for data, where in zip(encoded, names)]
        else:
            assessed = await asyncio.gather(*(loop.run_in_executor(self.decoders, self._decode_and_assess, data,
                                                                   where) for data, where in zip(encoded, names)))
        return Prepared(protocol, [image for image, _ in assessed], heatmap, request, [flags for _, flags in assessed],
                        ages)

    def _decode_and_assess(self, data: bytes, where: str) -> tuple[PreparedImage, list[str]]:
        """Stage 1 and the gate, then the quality flags, measured on the same decoded gray pixels (version-free)."""
        image = decode_upload(data, self.settings, where)
        return image, quality_flags(image.pixels)

    def _check_count(self, n: int) -> None:
        if n < 1:
            raise reject("invalid_request", "the request holds no image")
        if n > self.settings.max_images_per_request:
            raise reject("too_many_images", f"{n} images in one request; at most "
                                            f"{self.settings.max_images_per_request}")

    def _v1_elements(self, payload: dict) -> tuple[list[bytes], bool, list[float | None]]:
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise reject("invalid_request", 'the v1 body needs an "instances" list')
        self._check_count(len(instances))
        parameters = payload.get("parameters") or {}
        heatmap = isinstance(parameters, dict) and _truthy(parameters.get("heatmap", False))
        request_age = _age(parameters.get(AGE_PARAMETER), f"parameters.{AGE_PARAMETER}") \
            if isinstance(parameters, dict) else None
        encoded, ages = [], []
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
            own = _age(instance.get(AGE_PARAMETER), f"{where}.{AGE_PARAMETER}") if isinstance(instance, dict) else None
            ages.append(own if own is not None else request_age)
        return encoded, heatmap, ages

    def _v2_elements(self, request: InferRequest) -> tuple[list[bytes], bool, list[float | None]]:
        try:
            parameters = to_http_parameters(request.parameters) if request.parameters else {}
        except (AttributeError, TypeError, ValueError):
            raise reject("invalid_request", "the request parameters must be an object") from None
        heatmap = _truthy(parameters.get("heatmap", False))
        age = _age(parameters.get(AGE_PARAMETER), f"the request parameter {AGE_PARAMETER}")
        for wanted in request.request_outputs or []:
            if wanted.name not in OUTPUTS:
                raise reject("invalid_request", f"unknown output {str(wanted.name)[:64]!r}; this model returns "
                                                f"{list(OUTPUTS)}")
            heatmap = heatmap or wanted.name in ("heatmap_png", "cam", "lung_mask", "input_box")
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            raise reject("invalid_tensor", f"expected exactly one input named {INPUT!r}, got "
                                           f"{[str(i.name)[:64] for i in request.inputs][:4]}")
        tensor: InferInput = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise reject("invalid_tensor", f"input {INPUT!r} must be BYTES (one encoded file per element), "
                                           f"not {str(tensor.datatype)[:16]}")
        shape = list(tensor.shape or [])
        if len(shape) != 1 or not isinstance(shape[0], int) or isinstance(shape[0], bool) or shape[0] < 1:
            raise reject("invalid_tensor", f"input {INPUT!r} must have shape [N] with N >= 1, got {shape[:4]}")
        self._check_count(shape[0])  # before a single element is deserialised
        raw = getattr(tensor, "_raw_data", None)
        if raw is not None:
            try:
                elements = decode_bytes_elements(raw, shape[0], INPUT)
            except WireFormatError as exc:
                raise reject("invalid_tensor", str(exc)) from None
        else:
            elements = tensor.data if isinstance(tensor.data, list) else None
            if elements is None:
                raise reject("invalid_tensor", f"input {INPUT!r} has no data")
            if len(elements) != shape[0]:
                raise reject("invalid_tensor", f"input {INPUT!r} has shape {shape} but {len(elements)} elements")
        return [element_bytes(v, f"{INPUT}[{i}]") for i, v in enumerate(elements)], heatmap, [age] * len(elements)

    # -- predict / explain ------------------------------------------------------------------------
    async def predict(self, prepared: Prepared, headers=None, response_headers=None) -> Scored:
        answer = await self.client.infer([im.pixels for im in prepared.images], headers, prepared.patient_ages())
        self._refer_other_views(answer, prepared.images)
        return Scored(prepared, answer)

    def _refer_other_views(self, answer: Answer, images: list[PreparedImage]) -> None:
        """REFER, outside the intended use, for a film whose DICOM header names a lateral, decubitus or oblique view,
        whatever the version decided: every version reads frontal films only (``model.intended_use.view_reason``)."""
        for i, image in enumerate(images):
            reason = view_reason(image.view_position)
            if reason is None:
                continue
            answer.decision[i], answer.in_intended_use[i] = REFER, False
            answer.refer_reasons[i] = [*answer.refer_reasons[i], {"code": reason.code, "text": reason.text}]
            REFER_REASONS.labels(model_name=self.name, model_version=answer.model_version, reason=reason.code).inc()

    async def explain(self, prepared: Prepared, headers=None) -> Scored:
        prepared.heatmap = True
        return await self.predict(prepared, headers)

    # -- postprocess -------------------------------------------------------------------------------
    async def postprocess(self, scored: Scored, headers=None, response_headers=None):
        prepared, answer = scored.prepared, scored.answer
        pngs = cams = None
        if prepared.heatmap:
            pngs = await asyncio.get_running_loop().run_in_executor(self.decoders, self._render, prepared.images,
                                                                    answer.cam, answer.input_box)
            cams = np.stack([heatmaps.normalise_cam(c) for c in answer.cam]).astype(np.float32)
        if prepared.protocol == "v1":
            predictions = []
            for i, (p, label, threshold) in enumerate(zip(answer.probability, answer.label, answer.threshold)):
                score = float(answer.ood_score[i])
                item = {"probability": float(p), "label": label, "threshold": float(threshold),
                        "decision": answer.decision[i], "ood_score": score if np.isfinite(score) else None,
                        "in_intended_use": answer.in_intended_use[i], "refer_reasons": answer.refer_reasons[i],
                        "model_name": self.name, "model_version": answer.model_version,
                        "quality_flags": prepared.quality[i]}
                if answer.model_sha256:
                    item[MODEL_DIGEST_PARAMETER] = answer.model_sha256
                if pngs is not None:
                    item["heatmap_png"] = pngs[i]
                if answer.lung_share is not None:
                    item["lung_share"] = float(answer.lung_share[i])
                    item["lung_mask_source"] = answer.lung_mask_source[i]
                    if pngs is not None:
                        item["input_box"] = [float(b) for b in answer.input_box[i]]
                predictions.append(item)
            return {"predictions": predictions, "intended_use": answer.intended_use}
        outputs = [tensor_output("probability", "FP32", answer.probability),
                   tensor_output("label", "BYTES", np.array(answer.label, dtype=np.object_)),
                   tensor_output("threshold", "FP32", answer.threshold),
                   tensor_output("decision", "BYTES", np.array(answer.decision, dtype=np.object_)),
                   tensor_output("ood_score", "FP32", answer.ood_score),
                   tensor_output("in_intended_use", "BOOL", np.array(answer.in_intended_use, dtype=bool)),
                   tensor_output("refer_reasons", "BYTES", np.array(
                       [json.dumps(r, separators=(",", ":")) for r in answer.refer_reasons], dtype=np.object_))]
        if pngs is not None:
            outputs.append(tensor_output("heatmap_png", "BYTES", np.array(pngs, dtype=np.object_)))
            outputs.append(tensor_output("cam", "FP32", cams))
        outputs.append(tensor_output("quality_flags", "BYTES",
                                     np.array([json.dumps(f) for f in prepared.quality], dtype=np.object_)))
        if answer.lung_share is not None:
            outputs.append(tensor_output("lung_share", "FP32", answer.lung_share))
            outputs.append(tensor_output("lung_mask_source", "BYTES",
                                         np.array(answer.lung_mask_source, dtype=np.object_)))
            if pngs is not None:
                outputs.append(tensor_output("lung_mask", "UINT8", answer.lung_mask))
                outputs.append(tensor_output("input_box", "FP32", answer.input_box))
        request = prepared.request
        digest = {MODEL_DIGEST_PARAMETER: answer.model_sha256} if answer.model_sha256 else None
        return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=answer.model_version, infer_outputs=outputs,
                             use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs,
                             parameters={INTENDED_USE_PARAMETER: json.dumps(answer.intended_use, separators=(",", ":"),
                                                                            sort_keys=True), **(digest or {})})

    def _render(self, images: list[PreparedImage], cams: np.ndarray, boxes: np.ndarray | None = None) -> list[str]:
        """The predictor's CAM over the stage-1 pixels this transformer already decoded (no second decode), placed
        on the part of the film the model saw (``input_box``)."""
        boxes = [None] * len(images) if boxes is None else boxes
        return [base64.b64encode(heatmaps.render_overlay(img.pixels, cam, self.settings.heatmap_max_side, box=box)
                                 ).decode("ascii") for img, cam, box in zip(images, cams, boxes)]
