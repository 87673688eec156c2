"""The transformer's link to the predictor: Open Inference Protocol v2 over gRPC (default) or REST.

Tensors travel as raw bytes both ways (gRPC ``raw_input_contents``/``raw_output_contents``, REST binary
extension). A predictor that is down or restarting becomes :class:`PredictorUnavailable` (503) within
a fraction of a second; the gRPC channel retries its connection at most every second, so service
resumes by itself once the predictor is back.
"""

from __future__ import annotations

import json
import logging
import uuid

import numpy as np
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse

from serving.errors import PredictorUnavailable, RequestRejected

log = logging.getLogger(__name__)

_GRPC_RETRY = json.dumps({"methodConfig": [{
    "name": [{}],
    "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]})
_FORWARD_HEADERS = ("x-request-id", "x-b3-traceid", "traceparent")


class PredictorClient:
    def __init__(self, host: str, protocol: str, model_name: str, timeout_s: float = 30.0):
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
        self._channel = None
        self._stub = None
        self._http = None

    def _request(self, x: np.ndarray, request_id: str) -> InferRequest:
        tensor = InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        parameters = {"binary_data_output": True} if self.protocol == "v2" else None
        return InferRequest(model_name=self.model_name, infer_inputs=[tensor], request_id=request_id,
                            parameters=parameters)

    async def infer(self, x: np.ndarray, headers: dict | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """Float32 [N,1,S,S] -> (logits [N], cams [N,h,w], the predictor's model version)."""
        forward = {k: v for k, v in (headers or {}).items() if k.lower() in _FORWARD_HEADERS}
        request = self._request(x, forward.get("x-request-id") or str(uuid.uuid4()))
        if self.protocol == "grpc-v2":
            response = await self._grpc(request, forward)
        else:
            response = await self._rest(request, forward)
        try:
            logits = response.get_output_by_name("logit").as_numpy().reshape(-1)
            cams = response.get_output_by_name("cam").as_numpy()
        except (AttributeError, ValueError) as exc:
            raise PredictorUnavailable(self.model_name, f"malformed predictor response: {exc}") from None
        return logits.astype(np.float32, copy=False), cams.astype(np.float32, copy=False), str(
            response.model_version or "")

    # -- gRPC --------------------------------------------------------------------------------------
    async def _grpc(self, request: InferRequest, metadata: dict) -> InferResponse:
        import grpc

        if self._stub is None:
            from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

            self._channel = grpc.aio.insecure_channel(self.host, options=[
                ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.enable_retries", 1), ("grpc.service_config", _GRPC_RETRY),
                # Reconnect quickly after a predictor restart instead of gRPC's default 1 s -> 120 s backoff.
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000)])
            self._stub = GRPCInferenceServiceStub(self._channel)
        try:
            reply = await self._stub.ModelInfer(request.to_grpc(), timeout=self.timeout_s,
                                                metadata=tuple(metadata.items()))
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code(), (exc.details() or "").strip()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise RequestRejected("refused_by_predictor", f"the predictor refused the tensor: {detail}") from None
            log.warning("predictor call failed: %s %s", code.name, detail[:200])
            raise PredictorUnavailable(self.model_name, f"{code.name.lower()}: {detail[:200]}") from None
        return InferResponse.from_grpc(reply)

    # -- REST --------------------------------------------------------------------------------------
    async def _rest(self, request: InferRequest, headers: dict) -> InferResponse:
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout_s,
                                           limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        body, json_length = request.to_rest()
        headers = dict(headers, **{"content-type": "application/octet-stream",
                                   "inference-header-content-length": str(json_length)})
        url = f"http://{self.host}/v2/models/{self.model_name}/infer"
        try:
            reply = await self._http.post(url, content=body, headers=headers)
        except httpx.TransportError as exc:
            log.warning("predictor call failed: %r", exc)
            raise PredictorUnavailable(self.model_name, f"{type(exc).__name__}: {exc}"[:200]) from None
        if reply.status_code != 200:
            detail = reply.text[:200]
            if reply.status_code in (400, 422):
                raise RequestRejected("refused_by_predictor", f"the predictor refused the tensor: {detail}")
            raise PredictorUnavailable(self.model_name, f"HTTP {reply.status_code}: {detail}")
        length = int(reply.headers.get("inference-header-content-length", len(reply.content)))
        return InferResponse.from_bytes(reply.content, length)
