"""Run NVIDIA tritonclient (HTTP and gRPC) against a pneumoscope transformer; print one JSON object.

A separate process on purpose: tritonclient's gRPC protobufs and kserve's register the same
``inference.*`` names, so the two cannot be imported into one interpreter (the test process has kserve).

    python tests/serving_triton_client.py [--host NAME] [--age AGE] HTTP_HOST:PORT GRPC_HOST:PORT IMAGE [IMAGE ...]

``--host`` sends ``Host: NAME`` (HTTP) and ``:authority NAME`` (gRPC), for an ingress that routes by host.
``--age`` also sends the request again with the parameter ``patient_age``.
"""

from __future__ import annotations

import base64
import io
import json
import sys

import numpy as np


def main(http_url: str, grpc_url: str, paths: list[str], host: str | None = None, age: str | None = None) -> dict:
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    files = np.array([open(p, "rb").read() for p in paths], dtype=np.object_)
    out: dict = {}

    headers = {"Host": host} if host else None
    http = th.InferenceServerClient(http_url)
    out["http_ready"] = http.is_model_ready("pneumonia", headers=headers)
    out["http_metadata"] = http.get_model_metadata("pneumonia", headers=headers)
    tensor = th.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=True)
    reply = http.infer("pneumonia", [tensor], outputs=[th.InferRequestedOutput("probability", binary_data=True),
                                                      th.InferRequestedOutput("label", binary_data=False)],
                       headers=headers)
    out["http"] = {"probability": reply.as_numpy("probability").tolist(),
                   "label": [x.decode() if isinstance(x, bytes) else x for x in reply.as_numpy("label")],
                   "model_version": reply.get_response().get("model_version")}

    grpc = tg.InferenceServerClient(grpc_url, channel_args=[("grpc.default_authority", host)] if host else None)
    out["grpc_ready"] = grpc.is_model_ready("pneumonia")
    meta = grpc.get_model_metadata("pneumonia", as_json=True)
    out["grpc_metadata"] = {"inputs": meta["inputs"], "outputs": [o["name"] for o in meta["outputs"]]}
    tensor = tg.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(files)
    reply = grpc.infer("pneumonia", [tensor], parameters={"heatmap": True})
    pngs = [Image.open(io.BytesIO(base64.b64decode(p))) for p in reply.as_numpy("heatmap_png")]
    response = reply.get_response()
    out["grpc"] = {"probability": reply.as_numpy("probability").tolist(),
                   "label": [x.decode() for x in reply.as_numpy("label")],
                   "threshold": reply.as_numpy("threshold").tolist(),
                   "decision": [x.decode() for x in reply.as_numpy("decision")],
                   "ood_score": [None if x != x else float(x) for x in reply.as_numpy("ood_score")],
                   "in_intended_use": [bool(x) for x in reply.as_numpy("in_intended_use")],
                   "refer_reasons": [json.loads(x) for x in reply.as_numpy("refer_reasons")],
                   "intended_use": json.loads(response.parameters["intended_use"].string_param),
                   "cam_shape": list(reply.as_numpy("cam").shape),
                   "heatmap_formats": [p.format for p in pngs],
                   "model_version": response.model_version}
    if age:  # the request parameter patient_age, over gRPC
        aged = grpc.infer("pneumonia", [tensor], parameters={"patient_age": age})
        out["grpc_with_age"] = {"decision": [x.decode() for x in aged.as_numpy("decision")],
                                "refer_reasons": [json.loads(x) for x in aged.as_numpy("refer_reasons")]}
    bad = tg.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"this is not an image"], dtype=np.object_))
    try:
        grpc.infer("pneumonia", [bad])
        out["grpc_bad"] = "accepted"
    except InferenceServerException as exc:
        out["grpc_bad"] = exc.status()
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    host = age = None
    while args[0] in ("--host", "--age"):
        if args[0] == "--host":
            host = args[1]
        else:
            age = args[1]
        args = args[2:]
    print(json.dumps(main(args[0], args[1], args[2:], host=host, age=age)))
