"""``pneumoscope predict``: send one image to a running transformer over REST v1, REST v2 or gRPC v2.

REST v2 uses the binary tensor extension (the file travels as raw bytes, not base64); gRPC uses
``raw_input_contents`` (through tritonclient: importing kserve parses the importing program's argv).
Every call returns the same dict: probability, label, threshold, decision (PNEUMONIA | NORMAL | REFER),
ood_score, in_intended_use, refer_reasons, model_name, model_version, intended_use (the version's profile and
registered figures) and, when asked, the heatmap PNG bytes. ``patient_age`` (years, or a DICOM age string such
as ``045Y``) travels as the request parameter of that name; a DICOM file's own Patient's Age is read by the server.

``host`` sets the HTTP ``Host`` header (gRPC: ``:authority``) for an ingress that routes by host name,
as KServe's does: ``--url http://INGRESS --host pneumonia.NAMESPACE.example.com``.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from model.wire_format import bytes_input, encode_request


class ClientError(Exception):
    """The server refused the request or could not be reached; the message is one line."""


def _http_error(response, url: str, host: str | None = None) -> ClientError:
    try:
        message = response.json().get("error") or response.text
    except ValueError:
        if response.status_code == 404:  # not the model server's JSON: the ingress knows no such host
            return _not_routed("HTTP", url, host)
        message = response.text
    return ClientError(f"HTTP {response.status_code}: {str(message).strip()[:300]}")


def _not_routed(protocol: str, url: str, host: str | None) -> ClientError:
    what = f"host {host} is" if host else "this address is"
    return ClientError(f"{protocol} 404 from {url}: {what} not routed there (check --host and the ingress rules)")


def _headers(host: str | None) -> dict:
    return {"host": host} if host else {}


def _parameters(heatmap: bool, patient_age) -> dict:
    parameters = {"heatmap": bool(heatmap)}
    if patient_age is not None:
        parameters["patient_age"] = str(patient_age)
    return parameters


def predict_v1(url: str, data: bytes, model: str = "pneumonia", heatmap: bool = False, timeout: float = 60.0,
               host: str | None = None, patient_age=None) -> dict:
    import httpx

    verb = "explain" if heatmap else "predict"
    body = {"instances": [{"image": {"b64": base64.b64encode(data).decode("ascii")}}],
            "parameters": _parameters(heatmap, patient_age)}
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/models/{model}:{verb}", json=body, timeout=timeout,
                              headers=_headers(host))
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise _http_error(response, url, host)
    reply = response.json()
    result = dict(reply["predictions"][0])
    result["intended_use"] = reply.get("intended_use", {})
    if "heatmap_png" in result:
        result["heatmap_png"] = base64.b64decode(result["heatmap_png"])
    return result


def predict_v2(url: str, data: bytes, model: str = "pneumonia", heatmap: bool = False, timeout: float = 60.0,
               host: str | None = None, patient_age=None) -> dict:
    import httpx

    body, headers = encode_request([bytes_input("image", [data])], _parameters(heatmap, patient_age))
    try:
        response = httpx.post(f"{url.rstrip('/')}/v2/models/{model}/infer", content=body, timeout=timeout,
                              headers={**headers, **_headers(host)})
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise _http_error(response, url, host)
    reply = response.json()
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    decision = {name: outputs[name][0] for name in ("decision", "ood_score", "in_intended_use", "refer_reasons")}
    return _result(reply.get("model_name", model), reply.get("model_version"), outputs["probability"][0],
                   outputs["label"][0], outputs["threshold"][0],
                   outputs["heatmap_png"][0] if "heatmap_png" in outputs else None, decision,
                   (reply.get("parameters") or {}).get("intended_use"))


def predict_grpc(target: str, data: bytes, model: str = "pneumonia", heatmap: bool = False,
                 timeout: float = 60.0, host: str | None = None, patient_age=None) -> dict:
    """gRPC v2 through NVIDIA's tritonclient (kserve's client would parse this program's argv on import)."""
    try:
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException
    except ImportError:  # not in the serve extra: the servers never need it
        raise ClientError("--protocol grpc needs tritonclient: pip install 'tritonclient[grpc]==2.73.0'") from None

    target = target.split("://", 1)[-1].rstrip("/")
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    try:
        client = triton.InferenceServerClient(target, channel_args=[("grpc.default_authority", host)] if host else None)
        reply = client.infer(model, [tensor], parameters=_parameters(heatmap, patient_age), client_timeout=timeout)
    except InferenceServerException as exc:
        if "status: 404" in str(exc.message()):  # an HTTP/2 proxy in front answered 404 for the authority
            raise _not_routed("gRPC", target, host) from None
        raise ClientError(f"gRPC {exc.status() or ''} {exc.message()}".strip()) from None
    response = reply.get_response()
    png = reply.as_numpy("heatmap_png")
    decision = {name: reply.as_numpy(name)[0] for name in ("decision", "ood_score", "in_intended_use", "refer_reasons")}
    summary = response.parameters["intended_use"].string_param if "intended_use" in response.parameters else None
    return _result(response.model_name, response.model_version, reply.as_numpy("probability")[0],
                   reply.as_numpy("label")[0].decode(), reply.as_numpy("threshold")[0],
                   png[0].decode("ascii") if png is not None else None, decision, summary)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _result(model_name, model_version, probability, label, threshold, heatmap_b64, decision: dict,
            intended_use: str | None) -> dict:
    """The same dict from every protocol: v2 carries the reasons as JSON text, gRPC as bytes."""
    score = None if decision["ood_score"] is None else float(decision["ood_score"])
    result = {"probability": float(probability), "label": str(label), "threshold": float(threshold),
              "decision": _text(decision["decision"]),
              "ood_score": score if score is not None and math.isfinite(score) else None,
              "in_intended_use": bool(decision["in_intended_use"]),
              "refer_reasons": json.loads(_text(decision["refer_reasons"])),
              "model_name": model_name, "model_version": model_version,
              "intended_use": json.loads(intended_use) if intended_use else {}}
    if heatmap_b64 is not None:
        result["heatmap_png"] = base64.b64decode(heatmap_b64)
    return result


PROTOCOLS = {"v1": predict_v1, "v2": predict_v2, "grpc": predict_grpc}


def predict(url: str, data: bytes, protocol: str = "v2", model: str = "pneumonia", heatmap: bool = False,
            timeout: float = 60.0, host: str | None = None, patient_age=None) -> dict:
    if protocol not in PROTOCOLS:
        raise ClientError(f"unknown protocol {protocol!r} (v1, v2 or grpc)")
    return PROTOCOLS[protocol](url, data, model=model, heatmap=heatmap, timeout=timeout, host=host,
                               patient_age=patient_age)
