"""kserve's DataPlane with raw binary inputs and a readiness that knows about draining.

- Binary REST v2 requests are decoded by :mod:`model.wire_format` and keep their raw bytes: kserve 0.21
  turns every binary input into a Python list.
- Readiness is false while the process drains (kserve's DataPlane always says True), but requests
  already admitted still run.
"""

from __future__ import annotations

from typing import Any

from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from model.wire_format import HEADER_LENGTH, WireFormatError, decode_request
from serving.admission import Admission
from serving.errors import RequestRejected
from serving.metrics import reject_count


def parse_binary_request(body: bytes, json_length: Any, model_name: str) -> InferRequest:
    """REST v2 binary extension -> InferRequest whose binary inputs keep ``_raw_data`` (no list copy).

    Everything the client controls is checked by :func:`model.wire_format.decode_request` before any
    work; what it refuses is a 400 ``invalid_request``.
    """
    try:
        wire = decode_request(body, json_length)
    except WireFormatError as exc:
        reject_count("invalid_request")
        raise RequestRejected("invalid_request", str(exc)) from None
    inputs = []
    for item in wire.inputs:
        tensor = InferInput(name=item.name, shape=item.shape, datatype=item.datatype, parameters=item.parameters)
        if item.raw is not None:
            tensor._raw_data = item.raw  # kserve's own from_bytes sets this attribute too; as_numpy() reads it.
        else:
            tensor.data = item.data
        inputs.append(tensor)
    requested = None
    if wire.outputs is not None:
        requested = [RequestedOutput(name=o.name, parameters=o.parameters) for o in wire.outputs] or None
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=wire.id,
                        parameters=wire.parameters, request_outputs=requested)


class PneumoscopeDataPlane(DataPlane):
    def __init__(self, *args, admission: Admission | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.admission = admission

    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, bytes):
            return parse_binary_request(body, headers.get(HEADER_LENGTH), model_name)
        return super().decode_inference_request(body, headers, model_name)

    def _draining(self) -> bool:
        return self.admission is not None and self.admission.draining

    async def ready(self) -> bool:
        """Ready while every model is, and not while draining (KServe's DataPlane always says True)."""
        if self._draining():
            return False
        models = self.model_registry.get_models().values()
        return bool(models) and all([await m.healthy() for m in models])

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        """Readiness probes see False while draining. kserve's inference handlers ask with
        ``disable_predictor_health_check=True``: requests already admitted must still run."""
        ready = await super().model_ready(model_name, disable_predictor_health_check)
        return ready and (disable_predictor_health_check or not self._draining())

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        if getattr(model, "model_version", None):
            metadata["versions"] = [str(model.model_version)]
        metadata["platform"] = getattr(model, "platform", "") or ""
        return metadata
