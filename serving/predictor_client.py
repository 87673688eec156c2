"""The transformer's link to the predictor: Open Inference Protocol v2 over gRPC (default) or REST.

One call per client request carries all of its images (``pixels`` + ``sizes``, see
:mod:`serving.protocol`), so one model version answers all of them. Tensors travel as raw bytes both
ways. The call's timeout is what is left of the client's deadline. A predictor that is down,
restarting, overloaded or draining becomes :class:`PredictorUnavailable` (503) within a fraction of a
second; the gRPC channel retries its connection at most every second, so service resumes by itself.
Details (addresses, gRPC debug strings) are logged, never sent to the client.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field

import numpy as np
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, to_http_parameters

from model.preprocessing import DECODED_MAX_SIDE, PREPROCESSING_VERSION
from serving.admission import remaining
from serving.errors import DeadlineExceeded, PredictorUnavailable, RequestRejected
from serving.metrics import PREDICTOR_ERRORS, reject_count
from serving.protocol import (AGES, DECISION_OUTPUTS, INTENDED_USE_PARAMETER, MODEL_DIGEST_PARAMETER, PIXELS,
                              PREPROCESSING_PARAMETER, SIZES, pack_images, transport_bytes)

log = logging.getLogger(__name__)

_GRPC_RETRY = json.dumps({"methodConfig": [{
    "name": [{}],
    "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]})
_FORWARD_HEADERS = ("x-request-id", "x-b3-traceid", "traceparent")
_PRINTABLE = re.compile(r"^[\x20-\x7e]{1,512}$")
#: The predictor's answer: small vectors, N coarse CAMs (7x7 for 224 px) and N short JSON lists of reasons.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
OUTPUT_NAMES = ("probability", "label", "threshold", "logit", "cam")
#: The answer of a predictor that predates the decision outputs (older software during a rollout): nothing vouches
#: for the film, so it is referred. Version-independent, so the transformer may say it.
UNKNOWN_USE_REASON = {"code": "intended_use_unknown", "text": "The model server that answered does not check the "
                      "intended use (older software), so nothing tells whether the film lies within it."}

LUNG_OUTPUT_NAMES = ("lung_share", "lung_mask", "lung_mask_source", "input_box")


@dataclass
class Answer:
    """What one model version computed for the images of one request."""

    probability: np.ndarray  # float32 [N]
    label: list[str]
    threshold: np.ndarray  # float32 [N]
    logit: np.ndarray  # float32 [N]
    cam: np.ndarray  # float32 [N, h, w]
    model_version: str
    model_sha256: str = ""  # the served bundle's digest, when the predictor names it
    decision: list[str] = field(default_factory=list)  # PNEUMONIA | NORMAL | REFER
    ood_score: np.ndarray | None = None  # float32 [N], NaN where the version has no detector
    in_intended_use: list[bool] = field(default_factory=list)
    refer_reasons: list[list[dict]] = field(default_factory=list)  # per image: [{"code", "text"}, ...]
    intended_use: dict = field(default_factory=dict)  # the version's summary (profile, figures, ...)
    # Where the evidence falls (serving.predictor): absent from a predictor revision that predates them.
    lung_share: np.ndarray | None = None  # float32 [N], -1 where the CAM has no positive mass
    lung_mask: np.ndarray | None = None  # uint8 [N, 128, 128]
    lung_mask_source: list[str] | None = None
    input_box: np.ndarray | None = None  # float32 [N, 4]: what the CAM covers, in fractions of the image


def _read_decision(answer: Answer, response: InferResponse, n: int) -> None:
    """The decision outputs of the version that answered; a predictor without them refers every image."""
    got = {name: response.get_output_by_name(name) for name in DECISION_OUTPUTS}
    if any(v is None for v in got.values()):
        answer.decision, answer.in_intended_use = ["REFER"] * n, [False] * n
        answer.ood_score = np.full(n, np.nan, dtype=np.float32)
        answer.refer_reasons = [[dict(UNKNOWN_USE_REASON)] for _ in range(n)]
        return
    text = [v.decode() if isinstance(v, bytes) else str(v) for v in got["decision"].as_numpy()]
    reasons = [json.loads(v.decode() if isinstance(v, bytes) else str(v)) for v in got["refer_reasons"].as_numpy()]
    answer.decision, answer.refer_reasons = text, reasons
    answer.ood_score = got["ood_score"].as_numpy().astype(np.float32).reshape(-1)
    answer.in_intended_use = [bool(v) for v in got["in_intended_use"].as_numpy().reshape(-1)]
    if (len(text) != n or len(reasons) != n or answer.ood_score.shape != (n,) or len(answer.in_intended_use) != n
            or not all(d in ("PNEUMONIA", "NORMAL", "REFER") for d in text)
            or not all(isinstance(r, list) and all(isinstance(x, dict) and {"code", "text"} <= set(x) for x in r)
                       for r in reasons)):
        raise ValueError(f"decision outputs malformed for {n} images")
    parameters = response.parameters or {}
    if not isinstance(parameters, dict):  # gRPC: a map of InferParameter
        parameters = to_http_parameters(parameters)
    summary = parameters.get(INTENDED_USE_PARAMETER)
    answer.intended_use = json.loads(summary) if isinstance(summary, str) else {}


def parse_rest_response(content: bytes, header_length: str | None) -> InferResponse:
    """A v2 REST response (JSON, or JSON + binary outputs). kserve's ``InferResponse.from_bytes`` drops
    ``model_version``, which names the version that computed the answer: it is read from the JSON here."""
    length = int(header_length) if header_length is not None else len(content)
    response = InferResponse.from_bytes(content, length)
    if response.model_version is None:
        version = json.loads(content[:length]).get("model_version")
        response.model_version = None if version is None else str(version)
    return response


def _lung_outputs(answer: Answer, response: InferResponse, n: int) -> None:
    """The optional lung outputs onto ``answer``, checked (all four or none)."""
    got = {name: response.get_output_by_name(name) for name in LUNG_OUTPUT_NAMES}
    if all(v is None for v in got.values()):
        return
    if any(v is None for v in got.values()):
        raise ValueError(f"lung outputs {[k for k, v in got.items() if v is not None]} without the others")
    answer.lung_share = got["lung_share"].as_numpy().astype(np.float32).reshape(-1)
    answer.lung_mask = got["lung_mask"].as_numpy().astype(np.uint8)
    answer.lung_mask_source = [v.decode() if isinstance(v, bytes) else str(v)
                               for v in got["lung_mask_source"].as_numpy()]
    answer.input_box = got["input_box"].as_numpy().astype(np.float32)
    if (answer.lung_share.shape != (n,) or answer.lung_mask.ndim != 3 or len(answer.lung_mask) != n
            or len(answer.lung_mask_source) != n or answer.input_box.shape != (n, 4)):
        raise ValueError(f"lung outputs shaped {answer.lung_share.shape}, {answer.lung_mask.shape}, "
                         f"{answer.input_box.shape} for {n} images")


class PredictorClient:
    def __init__(self, host: str, protocol: str, model_name: str, timeout_s: float = 30.0, max_images: int = 32):
        if protocol not in ("grpc-v2", "v2"):
            raise ValueError(f"predictor protocol must be grpc-v2 or v2, not {protocol!r}")
        self.host = host.removeprefix("http://").removeprefix("grpc://").rstrip("/")
        if ":" not in self.host.rpartition("]")[2]:
            # KServe passes --predictor_host NAME-predictor.NAMESPACE: the Service's port 80 (gRPC would
            # otherwise dial 443), as kserve's own InferenceGRPCClient assumes.
            self.host += ":80"
        self.protocol = protocol
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_send_bytes = transport_bytes(max_images, DECODED_MAX_SIDE)
        self._channel = None
        self._stub = None
        self._http = None

    def _request(self, images: list[np.ndarray], request_id: str, ages: list[float | None] | None = None
                 ) -> InferRequest:
        pixels, sizes = pack_images(images)
        tensors = [(PIXELS, pixels, "UINT8"), (SIZES, sizes, "INT32")]
        if ages is not None and any(a is not None for a in ages):
            tensors.append((AGES, np.array([-1.0 if a is None else a for a in ages], dtype=np.float32), "FP32"))
        inputs = []
        for name, array, datatype in tensors:
            tensor = InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        parameters = {PREPROCESSING_PARAMETER: PREPROCESSING_VERSION}
        if self.protocol == "v2":
            parameters["binary_data_output"] = True
        return InferRequest(model_name=self.model_name, infer_inputs=inputs, request_id=request_id,
                            parameters=parameters)

    def _timeout(self) -> float:
        left = remaining(self.timeout_s)
        if left <= 0:
            PREDICTOR_ERRORS.labels(cause="deadline").inc()
            raise DeadlineExceeded("before the predictor was called")
        return min(left, self.timeout_s)

    async def infer(self, images: list[np.ndarray], headers: dict | None = None,
                    ages: list[float | None] | None = None) -> Answer:
        """Stage-1 pixels of one request (and each image's patient age in years, None where unknown) -> the answer
        of the model version the predictor serves."""
        # Tracing headers travel on, if they are what gRPC metadata may carry (printable ASCII).
        forward = {k.lower(): v for k, v in (headers or {}).items()
                   if k.lower() in _FORWARD_HEADERS and isinstance(v, str) and _PRINTABLE.match(v)}
        request = self._request(images, forward.get("x-request-id") or str(uuid.uuid4()), ages)
        timeout = self._timeout()
        if self.protocol == "grpc-v2":
            response = await self._grpc(request, forward, timeout)
        else:
            response = await self._rest(request, forward, timeout)
        return self._answer(response, len(images))

    def _answer(self, response: InferResponse, n: int) -> Answer:
        try:
            got = {name: response.get_output_by_name(name) for name in OUTPUT_NAMES}
            if any(v is None for v in got.values()):
                raise ValueError(f"outputs {[o.name for o in response.outputs]}")
            answer = Answer(got["probability"].as_numpy().astype(np.float32).reshape(-1),
                            [v.decode() if isinstance(v, bytes) else str(v) for v in got["label"].as_numpy()],
                            got["threshold"].as_numpy().astype(np.float32).reshape(-1),
                            got["logit"].as_numpy().astype(np.float32).reshape(-1),
                            got["cam"].as_numpy().astype(np.float32), str(response.model_version or ""),
                            str(to_http_parameters(response.parameters or {}).get(MODEL_DIGEST_PARAMETER) or ""))
            if (answer.probability.shape != (n,) or len(answer.label) != n or answer.threshold.shape != (n,)
                    or answer.cam.ndim != 3 or len(answer.cam) != n or not answer.model_version):
                raise ValueError(f"shapes probability {answer.probability.shape}, cam {answer.cam.shape}, "
                                 f"version {answer.model_version!r} for {n} images")
            _read_decision(answer, response, n)
            _lung_outputs(answer, response, n)
        except (AttributeError, ValueError, TypeError, UnicodeDecodeError) as exc:
            PREDICTOR_ERRORS.labels(cause="bad_response").inc()
            log.error("malformed predictor response: %s", exc)
            raise PredictorUnavailable(f"malformed response: {exc}") from None
        return answer

    def _failed(self, kind: str, detail: str):
        """Map the predictor's refusal (by gRPC code name / HTTP status class) to our error."""
        if kind == "INVALID_ARGUMENT":
            PREDICTOR_ERRORS.labels(cause="refused").inc()
            reject_count("refused_by_predictor")
            return RequestRejected("refused_by_predictor", f"the predictor refused the image: {detail[:300]}")
        if kind == "DEADLINE_EXCEEDED":
            PREDICTOR_ERRORS.labels(cause="deadline").inc()
            return DeadlineExceeded("waiting for the predictor")
        if kind == "FAILED_PRECONDITION":
            PREDICTOR_ERRORS.labels(cause="incompatible").inc()
            log.error("predictor %s refuses this transformer's pixels: %s", self.host, detail[:300])
            return PredictorUnavailable(detail)
        cause = "overloaded" if kind == "RESOURCE_EXHAUSTED" else "unavailable"
        PREDICTOR_ERRORS.labels(cause=cause).inc()
        log.warning("predictor %s: %s %s", self.host, kind, detail[:200])
        return PredictorUnavailable(f"{kind}: {detail[:200]}")

    # -- gRPC --------------------------------------------------------------------------------------
    async def _grpc(self, request: InferRequest, metadata: dict, timeout: float) -> InferResponse:
        import grpc

        if self._stub is None:
            from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

            self._channel = grpc.aio.insecure_channel(self.host, options=[
                ("grpc.max_send_message_length", self.max_send_bytes),
                ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                ("grpc.enable_retries", 1), ("grpc.service_config", _GRPC_RETRY),
                # Reconnect quickly after a predictor restart instead of gRPC's default 1 s -> 120 s backoff.
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000)])
            self._stub = GRPCInferenceServiceStub(self._channel)
        try:
            reply = await self._stub.ModelInfer(request.to_grpc(), timeout=timeout, metadata=tuple(metadata.items()))
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc.code().name, (exc.details() or "").strip()) from None
        return InferResponse.from_grpc(reply)

    # -- REST --------------------------------------------------------------------------------------
    async def _rest(self, request: InferRequest, headers: dict, timeout: float) -> InferResponse:
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        body, json_length = request.to_rest()
        headers = dict(headers, **{"content-type": "application/octet-stream",
                                   "inference-header-content-length": str(json_length),
                                   "x-request-timeout-ms": str(max(1, int(timeout * 1000)))})
        url = f"http://{self.host}/v2/models/{self.model_name}/infer"
        try:
            reply = await self._http.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            raise self._failed("DEADLINE_EXCEEDED", "") from None
        except httpx.TransportError as exc:
            raise self._failed("UNAVAILABLE", f"{type(exc).__name__}: {exc}") from None
        if reply.status_code != 200:
            kind = {400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
                    409: "FAILED_PRECONDITION", 504: "DEADLINE_EXCEEDED"}.get(reply.status_code, "UNAVAILABLE")
            try:
                detail = str(reply.json().get("error", ""))
            except ValueError:
                detail = reply.text
            raise self._failed(kind, f"HTTP {reply.status_code}: {detail[:300]}" if kind == "UNAVAILABLE" else detail)
        if len(reply.content) > MAX_RESPONSE_BYTES:
            raise self._failed("UNAVAILABLE", f"a {len(reply.content)}-byte response")
        try:
            return parse_rest_response(reply.content, reply.headers.get("inference-header-content-length"))
        except Exception as exc:  # a malformed body from the predictor, not the client's fault
            PREDICTOR_ERRORS.labels(cause="bad_response").inc()
            raise PredictorUnavailable(f"unreadable response: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._http is not None:
            await self._http.aclose()
