"""The transformer, seen from the app: Open Inference Protocol v2 over REST, and nothing else.

One request per study: ``POST {url}/v2/models/{model}/infer`` with the file as a BYTES tensor (binary
data extension, so a 30 MB upload does not grow by a third in base64) and ``parameters.heatmap``.
Outcomes: a :class:`InferenceResult`; :class:`InferenceRejected` when the transformer refuses the image
(400/413/415/422: the X-ray gate's message is for the doctor); :class:`InferenceUnavailable` for
anything that may pass with time (5xx, timeouts, refused connections, 404/429 while a rollout settles).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field

import httpx

from model.wire_format import bytes_input, encode_request

#: Statuses meaning "this image will never be accepted": the study is rejected, not retried.
REJECTING_STATUSES = {400, 413, 415, 422}


class InferenceRejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InferenceUnavailable(Exception):
    """The transformer did not answer usefully; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class InferenceResult:
    probability: float
    label: str
    threshold: float
    model_name: str
    model_version: str
    heatmap_png: bytes | None
    quality_flags: dict | list | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    decision: str | None = None  # PNEUMONIA | NORMAL | REFER (None from a transformer that predates it)
    ood_score: float | None = None
    in_intended_use: bool | None = None
    refer_reasons: list[dict] = field(default_factory=list)  # [{"code", "text"}]
    intended_use: dict = field(default_factory=dict)  # the answering version: profile, demonstration, figures


class InferenceClient:
    def __init__(self, url: str, model_name: str = "pneumonia", timeout_s: float = 30.0, host: str | None = None):
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.endpoint = f"{self.url}/v2/models/{model_name}/infer"
        headers = {"host": host} if host else {}
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers,
                                         limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def infer(self, data: bytes, timeout_s: float | None = None,
                    patient_age_years: float | None = None) -> InferenceResult:
        """``patient_age_years``: read from the original DICOM before de-identification; the predictor's version
        applies its age limit to it."""
        parameters = {"heatmap": True}
        if patient_age_years is not None:
            parameters["patient_age"] = f"{patient_age_years:.4f}"
        body, headers = encode_request([bytes_input("image", [data])], parameters)
        started = time.perf_counter()
        try:
            response = await self._client.post(
                self.endpoint, content=body, headers=headers,
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TimeoutException:
            raise InferenceUnavailable("timeout", "the inference service did not answer in time") from None
        except httpx.HTTPError as exc:
            raise InferenceUnavailable("unreachable", f"cannot reach the inference service: "
                                                      f"{type(exc).__name__}") from None
        seconds = time.perf_counter() - started
        if response.status_code in REJECTING_STATUSES:
            raise InferenceRejected(response.status_code, _error_message(response))
        if response.status_code != 200:
            raise InferenceUnavailable(f"http_{response.status_code}", f"the inference service answered "
                                       f"{response.status_code}: {_error_message(response)}")
        try:
            return _parse(response.json(), seconds)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise InferenceUnavailable("bad_response", f"the inference service sent an unexpected answer: "
                                                       f"{exc}") from None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error") or body.get("detail") or response.text
    except ValueError:
        message = response.text
    return " ".join(str(message).split())[:500] or f"HTTP {response.status_code}"


def _parse(reply: dict, seconds: float) -> InferenceResult:
    outputs = {o["name"]: o.get("data") for o in reply["outputs"]}
    heatmap = outputs.get("heatmap_png")
    flags = outputs.get("quality_flags")
    if isinstance(flags, list) and len(flags) == 1:
        flags = flags[0]
    if isinstance(flags, str):
        try:
            flags = json.loads(flags)
        except ValueError:
            flags = {"value": flags}
    probability = float(outputs["probability"][0])
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    result = InferenceResult(
        probability=probability, label=str(outputs["label"][0]), threshold=float(outputs["threshold"][0]),
        model_name=str(reply.get("model_name") or ""), model_version=str(reply.get("model_version") or ""),
        heatmap_png=base64.b64decode(heatmap[0]) if heatmap else None, quality_flags=flags, seconds=seconds)
    if "decision" in outputs:
        decision = str(outputs["decision"][0])
        if decision not in ("PNEUMONIA", "NORMAL", "REFER"):
            raise ValueError(f"unknown decision {decision[:20]!r}")
        score = outputs["ood_score"][0]
        reasons = json.loads(outputs["refer_reasons"][0])
        if not isinstance(reasons, list) or not all(isinstance(r, dict) and {"code", "text"} <= set(r)
                                                    for r in reasons):
            raise ValueError("refer_reasons is not a list of {code, text}")
        result.decision, result.refer_reasons = decision, reasons
        result.ood_score = None if score is None else float(score)
        result.in_intended_use = bool(outputs["in_intended_use"][0])
        summary = (reply.get("parameters") or {}).get("intended_use")
        result.intended_use = json.loads(summary) if isinstance(summary, str) else {}
    return result
