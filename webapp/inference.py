"""The transformer, seen from the app: Open Inference Protocol v2 over REST, and nothing else.

One request per study: ``POST {url}/v2/models/{model}/infer`` with the file as a BYTES tensor (binary
data extension, so a 30 MB upload does not grow by a third in base64) and ``parameters.heatmap``.
Outcomes: a :class:`InferenceResult`; :class:`InferenceRejected` when the transformer refuses the image
(400/413/415/422: the X-ray gate's message is for the doctor); :class:`InferenceUnavailable` for
anything that may pass with time (5xx, timeouts, refused connections, 404/429 while a rollout settles).

Besides ``probability``, ``label`` and ``threshold`` the app keeps what the answer carries when the model
server sends it (older servers send none of it, and the study shows what it has): ``decision``
(PNEUMONIA | NORMAL | REFER), ``refer_reasons`` (a JSON list of ``{code, text}`` per image), ``ood_score``,
``in_intended_use``, ``cam`` (the class-activation map, [N, h, w]), ``lung_mask`` ([N, h, w]) and
``cam_lung_share`` ([N]), and the model's description: a ``model_info`` output (JSON per image) or the
response's ``parameters`` (``model_profile``/``profile``, ``demonstration``, ``heldout``, ``refer_band``,
``intended_use``).
"""

from __future__ import annotations

import base64
import json
import math
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
    decision: str | None = None
    refer_reasons: list | None = None
    ood_score: float | None = None
    in_intended_use: bool | None = None
    model_info: dict | None = None
    cam: dict | None = None  # {"rows", "cols", "values"}: row-major, ReLU'd and scaled to [0, 1]
    lung_mask: dict | None = None  # same form, 0..1
    cam_lung_share: float | None = None


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


#: The model description's keys, as the answer's ``parameters`` may carry them.
MODEL_INFO_KEYS = ("model_profile", "profile", "demonstration", "heldout", "refer_band", "intended_use")
DECISIONS = ("PNEUMONIA", "NORMAL", "REFER")


def _parse(reply: dict, seconds: float) -> InferenceResult:
    outputs = {o["name"]: o.get("data") for o in reply["outputs"]}
    shapes = {o["name"]: o.get("shape") for o in reply["outputs"]}
    heatmap = outputs.get("heatmap_png")
    flags = _json_element(outputs.get("quality_flags"))
    if isinstance(flags, str):
        flags = {"value": flags}
    probability = float(outputs["probability"][0])
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    decision = str(outputs["decision"][0]) if outputs.get("decision") else None
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    reasons = _json_element(outputs.get("refer_reasons"))
    model_info = _json_element(outputs.get("model_info"))
    if not isinstance(model_info, dict):
        parameters = reply.get("parameters") or {}
        summary = parameters.get("intended_use")  # the answering version's summary (model.intended_use), JSON
        if isinstance(summary, str):
            try:
                summary = json.loads(summary)
            except ValueError:
                summary = None
        model_info = summary if isinstance(summary, dict) and summary else (
            {k: parameters[k] for k in MODEL_INFO_KEYS if k in parameters} or None)
    in_use = outputs.get("in_intended_use")
    reasons = _reasons(reasons)
    # null: a version without a detector (its NaN travels as JSON null); its answers are REFER, reason given
    ood_score = float(outputs["ood_score"][0]) if outputs.get("ood_score") and outputs["ood_score"][0] is not None \
        else None
    in_intended_use = _boolean(in_use[0]) if in_use else None
    digest = (reply.get("parameters") or {}).get("model_sha256")
    # what the DICOM gateway repeats in its structured report (gateway.result_facts), absent fields left out
    extra = {"decision": decision, "ood_score": ood_score, "in_intended_use": in_intended_use,
             "model_sha256": str(digest) if digest else None,
             "refer_reasons": [f"{r['code']}: {r['text']}" if r["text"] else r["code"] for r in reasons]
             if reasons else None}
    return InferenceResult(
        probability=probability, label=str(outputs["label"][0]), threshold=float(outputs["threshold"][0]),
        model_name=str(reply.get("model_name") or ""), model_version=str(reply.get("model_version") or ""),
        heatmap_png=base64.b64decode(heatmap[0]) if heatmap else None, quality_flags=flags, seconds=seconds,
        extra={k: v for k, v in extra.items() if v is not None},
        decision=decision, refer_reasons=reasons, ood_score=ood_score, in_intended_use=in_intended_use,
        model_info=model_info,
        cam=_grid(outputs.get("cam"), shapes.get("cam")), **_served_lungs(outputs, shapes))


def _served_lungs(outputs: dict, shapes: dict) -> dict:
    """The lung mask and CAM lung share the model server measured with its lung segmentation model
    (serving.predictor: ``lung_share``, ``lung_mask``, ``lung_mask_source``); nothing when it used only its
    elliptical prior, so that the web app measures with its own lung-field prior and says so."""
    if outputs.get("cam_lung_share"):
        return {"cam_lung_share": float(outputs["cam_lung_share"][0]),
                "lung_mask": _grid(outputs.get("lung_mask"), shapes.get("lung_mask"))}
    source = outputs.get("lung_mask_source")
    if not source or str(source[0]) != "segmentation" or not outputs.get("lung_share"):
        return {}
    share = float(outputs["lung_share"][0])
    return {"cam_lung_share": share if 0.0 <= share <= 1.0 else None,  # -1: the CAM had no positive mass
            "lung_mask": _grid(outputs.get("lung_mask"), shapes.get("lung_mask"))}


def _json_element(data):
    """The first element of a BYTES output that holds JSON per image (the element itself when it is not JSON)."""
    if isinstance(data, list):
        if len(data) != 1:
            return data or None
        data = data[0]
    if isinstance(data, str):
        try:
            return json.loads(data)
        except ValueError:
            return data
    return data


def _reasons(value) -> list | None:
    """``[{"code", "text"}]`` from a list of such objects or of bare codes."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError("refer_reasons must be a list")
    reasons = []
    for item in value:
        if isinstance(item, dict):
            reasons.append({"code": str(item.get("code", "")), "text": str(item.get("text", ""))})
        else:
            reasons.append({"code": str(item), "text": ""})
    return reasons


def _boolean(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _grid(data, shape) -> dict | None:
    """The first image's map of a [N, h, w] output, flattened row-major in JSON, as {"rows", "cols", "values"}."""
    if not data or not shape or len(shape) != 3:
        return None
    rows, cols = int(shape[1]), int(shape[2])
    if rows < 1 or cols < 1 or rows * cols > 256 * 256 or len(data) < rows * cols:
        raise ValueError(f"a map of shape {shape} with {len(data)} values")
    values = [round(float(v), 5) for v in data[:rows * cols]]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("a map with non-finite values")
    return {"rows": rows, "cols": cols, "values": values}
