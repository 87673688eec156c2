"""Serving, end to end: REAL predictor and transformer processes started by ``pneumoscope serve``.

One stack serves the whole module: a registered model (``models:/pneumonia@champion`` in a throw-away
MLflow registry) is resolved once, the predictor loads version 1 (the transformer holds no version),
and the tests talk to it over REST v1, REST v2 (JSON and binary), gRPC (kserve's client, tritonclient)
and the CLI client. The tests near the end kill the predictor (503, then recovery) and stop the stack
with SIGTERM.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from numerics import engine_logit_bound, probability_bound
from serving_fixtures import (XRAY_FULL, dicom_from_image, free_port_pair, register, require_data,
                              serve_until_ready, shared_bundle, stop_server, xray_files)

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 8_000_000
TESTS = Path(__file__).resolve().parents[1]  # tests/, where the shared helper scripts live


@dataclass
class Served:
    info: dict
    process: subprocess.Popen
    log: Path
    tracking_uri: str
    bundle: Path
    net: object

    @property
    def rest(self) -> str:
        return self.info["rest"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_data()
    root = tmp_path_factory.mktemp("serving")
    bundle, net = shared_bundle()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    assert register(bundle, tracking_uri) == "1"
    port = free_port_pair()
    log = root / "stack.log"
    # Room for the concurrency these tests make: everything admitted up to 64 (admission itself is tested in
    # test_serving_lifecycle.py).
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PNEUMOSCOPE_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD),
               PNEUMOSCOPE_MAX_BATCH_SIZE="8", PNEUMOSCOPE_THREADS="2", PNEUMOSCOPE_MAX_INFLIGHT="64",
               PNEUMOSCOPE_LATENCY_BUDGET_MS="600000",
               PNEUMOSCOPE_ENGINE_TIMING_S="0.3", PYTHONUNBUFFERED="1")
    process, info = serve_until_ready(["--model", "models:/pneumonia@champion", "--port", str(port)], env, root, log)
    served = Served(info, process, log, tracking_uri, bundle, net)
    yield served
    stop_server(process)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    require_data()
    return [f.read_bytes() for f in xray_files(per_class=3)] + [f.read_bytes() for f in xray_files(1, XRAY_FULL)]


@pytest.fixture(scope="module")
def served_precision(served) -> str:
    """The precision the predictor's selection chose (v2 metadata ``platform``: ENGINE_onnx/PRECISION)."""
    return httpx.get(f"{served.info['predictor_rest']}/v2/models/pneumonia").json()["platform"].partition("/")[2]


@pytest.fixture(scope="module")
def logit_bounds(served, images, served_precision) -> np.ndarray:
    """Per image of ``images``: how far this stack's logit may lie from another run of the same network, fp32
    or the stack's own engine in another batch or stream -- the float32 rounding bound of the network (fp32),
    or the gate's bound for the precision the selection chose (tests/numerics.py)."""
    from model.bundle import Bundle
    from model.engine_gate import GateSet
    from model.network import LogitAndCam
    from model.preprocessing import load_resized, normalize

    bundle = Bundle.load(served.bundle)
    x = normalize(np.stack([load_resized(b, bundle.preprocess).pixels for b in images]), bundle.preprocess)
    head = LogitAndCam(served.net).eval() if served_precision == "fp32" else None
    return engine_logit_bound(served_precision, GateSet.load(bundle).max_abs_logit_diff, head, x)


@pytest.fixture(scope="module")
def within(served, logit_bounds):
    """within(answers, reference, which): probabilities of ``images[which]`` at most their bound apart."""
    from model.bundle import Bundle

    temperature = Bundle.load(served.bundle).temperature

    def check(answers, reference, which) -> bool:
        reference = np.asarray(reference, dtype=np.float64)
        allowed = probability_bound(reference, logit_bounds[which], temperature)
        return bool((np.abs(np.asarray(answers, dtype=np.float64) - reference) <= allowed).all())

    return check


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v1(served, data, verb="predict", timeout=60, **body):
    payload = body or {"instances": [{"image": {"b64": b64(data)}}]}
    return httpx.post(f"{served.rest}/v1/models/pneumonia:{verb}", json=payload, timeout=timeout)


def v2_json(served, items, parameters=None):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(items)], "data": [b64(i) for i in items]}]}
    if parameters:
        body["parameters"] = parameters
    return httpx.post(f"{served.rest}/v2/models/pneumonia/infer", json=body, timeout=60)


def v2_binary(url, items, datatype="BYTES", parameters=None, extra=None):
    raw = b"".join(len(i).to_bytes(4, "little") + i for i in items) if datatype == "BYTES" else items
    shape = [len(items)] if datatype == "BYTES" else extra
    header = {"inputs": [{"name": "image", "datatype": datatype, "shape": shape,
                          "parameters": {"binary_data_size": len(raw)}}], "parameters": parameters or {}}
    head = json.dumps(header).encode()
    return httpx.post(f"{url}/v2/models/pneumonia/infer", content=head + raw, timeout=60,
                      headers={"content-type": "application/octet-stream",
                               "inference-header-content-length": str(len(head))})


def outputs(response) -> dict:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def assert_good(served, images):
    response = v1(served, images[0])
    assert response.status_code == 200, f"a good request failed after a bad one: {response.text}"


# ---------------------------------------------------------------------------------------------------

def test_ready_line_pins_the_alias_to_a_version(served):
    info = served.info
    assert info["model_version"] == "1" and info["model_uri"] == "models:/pneumonia/1"
    assert info["requested_uri"] == "models:/pneumonia@champion" and info["model_name"] == "pneumonia"
    assert info["rest"].startswith("http://127.0.0.1:") and info["grpc"].startswith("127.0.0.1:")
    assert int(info["grpc"].rsplit(":", 1)[1]) == int(info["rest"].rsplit(":", 1)[1]) + 1
    for pid in info["pids"].values():
        os.kill(pid, 0)  # both alive
    assert httpx.get(f"{info['predictor_rest']}/v2/models/pneumonia/ready").status_code == 200


def test_rest_v1_predict_and_explain(served, images, within):
    body = {"instances": [{"image": {"b64": b64(images[0])}}, {"image": {"b64": b64(images[-1])}}]}
    response = v1(served, None, **body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    for p in predictions:
        assert set(p) == {"probability", "label", "threshold", "decision", "ood_score", "in_intended_use",
                          "refer_reasons", "model_name", "model_version", "model_sha256", "quality_flags",
                          "lung_share", "lung_mask_source"}
        # the test bundle has no lung model: the share is measured with the elliptical prior (-1: no positive CAM)
        assert p["lung_mask_source"] == "ellipse_prior" and (0 <= p["lung_share"] <= 1 or p["lung_share"] == -1)
        assert 0 <= p["probability"] <= 1 and p["label"] in ("NORMAL", "PNEUMONIA") and p["model_version"] == "1"
        assert p["label"] == ("PNEUMONIA" if p["probability"] >= p["threshold"] else "NORMAL")
    explained = v1(served, images[-1], verb="explain").json()["predictions"][0]
    assert within([explained["probability"]], [predictions[1]["probability"]], [-1])  # a batch of 1, not 2
    heatmap = Image.open(io.BytesIO(base64.b64decode(explained["heatmap_png"])))
    assert heatmap.format == "PNG" and max(heatmap.size) <= 512


def test_rest_v2_json_binary_and_heatmap(served, images, within):
    as_json = outputs(v2_json(served, images[:3]))
    assert as_json["probability"]["datatype"] == "FP32" and as_json["probability"]["shape"] == [3]
    assert as_json["label"]["datatype"] == "BYTES" and len(as_json["threshold"]["data"]) == 3
    binary = outputs(v2_binary(served.rest, images[:3]))
    assert within(binary["probability"]["data"], as_json["probability"]["data"], slice(0, 3))
    labels = set(outputs(v2_json(served, images))["label"]["data"])
    assert labels == {"NORMAL", "PNEUMONIA"}, "the test bundle's threshold should split the test X-rays"
    with_heatmap = outputs(v2_json(served, images[:2], {"heatmap": True}))
    assert with_heatmap["cam"]["shape"][0] == 2 and len(with_heatmap["heatmap_png"]["data"]) == 2
    Image.open(io.BytesIO(base64.b64decode(with_heatmap["heatmap_png"]["data"][0]))).verify()
    reply = v2_json(served, images[:1]).json()
    assert reply["model_name"] == "pneumonia" and reply["model_version"] == "1"


def test_dicom_and_raw_image_bodies(served, images):
    dicom = dicom_from_image(images[-1])
    as_json = v1(served, dicom)
    assert as_json.status_code == 200, as_json.text
    raw = httpx.post(f"{served.rest}/v1/models/pneumonia:predict", content=dicom, timeout=60,
                     headers={"content-type": "application/dicom"})
    assert raw.status_code == 200, raw.text
    # the same DICOM, alone in its request both times: the same engine call, deterministic, so identical
    assert raw.json()["predictions"][0]["probability"] == as_json.json()["predictions"][0]["probability"]
    jpeg = httpx.post(f"{served.rest}/v1/models/pneumonia:explain", content=images[0], timeout=60,
                      headers={"content-type": "image/jpeg"})
    assert jpeg.status_code == 200 and "heatmap_png" in jpeg.json()["predictions"][0]


def test_v2_metadata_describes_inputs_and_outputs(served):
    meta = httpx.get(f"{served.rest}/v2/models/pneumonia").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    described = {o["name"]: o for o in meta["outputs"]}
    assert described["probability"] == {"name": "probability", "datatype": "FP32", "shape": [-1]}
    assert described["label"]["datatype"] == "BYTES" and "heatmap_png" in described
    assert not meta.get("versions"), "the transformer holds no model version"
    predictor = httpx.get(f"{served.info['predictor_rest']}/v2/models/pneumonia").json()
    assert predictor["versions"] == ["1"]
    assert predictor["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1]},
                                   {"name": "sizes", "datatype": "INT32", "shape": [-1, 2]},
                                   {"name": "ages", "datatype": "FP32", "shape": [-1]}]
    assert [o["name"] for o in predictor["outputs"]] == ["probability", "label", "threshold", "logit", "cam",
                                                         "decision", "ood_score", "in_intended_use", "refer_reasons",
                                                         "lung_share", "lung_mask", "lung_mask_source", "input_box"]
    by_name = {o["name"]: o for o in predictor["outputs"]}
    assert by_name["cam"]["shape"] == [-1, 4, 4] and by_name["lung_mask"]["shape"] == [-1, 128, 128]
    assert by_name["input_box"] == {"name": "input_box", "datatype": "FP32", "shape": [-1, 4]}
    assert described["decision"]["datatype"] == "BYTES" and described["in_intended_use"]["datatype"] == "BOOL"


def test_quality_flags_are_reported_and_never_change_the_decision(served, images):
    """A film blurred, one with a side marker and one with text over a lung field, on purpose: the blurred film
    and the text over the lung are flagged in v1 and v2, the side marker is not, and each label is still exactly
    probability >= threshold."""
    from PIL import Image

    from tests.model.test_quality_gate import blurred, stamped

    plain = images[-1]  # the full-resolution upload
    width = Image.open(io.BytesIO(plain)).width
    # the text over a lung goes on the NORMAL full-resolution film: over the opaque lung of the PNEUMONIA one it
    # stands out by less than the detector asks (BENCHMARKS.md, "Quality flags": it finds 87 % of planted labels)
    batch = [plain, blurred(plain, width / 60), stamped(plain, "R"), stamped(images[-2], "AP 10:42", "right-lung")]
    predictions = v1(served, b"", instances=[{"image": {"b64": b64(x)}} for x in batch]).json()["predictions"]
    flags = [p["quality_flags"] for p in predictions]
    assert "blurred" not in flags[0] and "blurred" in flags[1] and flags[2] == [], flags
    assert flags[3] == ["object_over_lungs"], flags
    for p in predictions:
        assert p["label"] == ("PNEUMONIA" if p["probability"] >= p["threshold"] else "NORMAL")
    v2 = outputs(v2_json(served, batch))
    assert [json.loads(f) for f in v2["quality_flags"]["data"]] == flags
    assert v2["quality_flags"]["datatype"] == "BYTES" and v2["quality_flags"]["shape"] == [4]
    # the same four images in one request both times: the same engine call, deterministic, so identical
    assert v2["probability"]["data"] == [p["probability"] for p in predictions]


def test_predictor_reports_the_engine_it_chose(served):
    """``auto`` gated and timed the engines at load; v2 metadata, /metrics and the log name the one serving.
    Which one depends on the CPU: fp32 on either engine, or bf16 on OpenVINO where the CPU computes it natively
    (the test bundle's int8 graph did not pass its export gate)."""
    from serving.engine import native_bf16

    predictor = httpx.get(f"{served.info['predictor_rest']}/v2/models/pneumonia").json()
    platform, _, precision = predictor["platform"].partition("/")
    allowed = {("onnxruntime_onnx", "fp32"), ("openvino_onnx", "fp32")} | (
        {("openvino_onnx", "bf16")} if native_bf16() else set())
    assert (platform, precision) in allowed, predictor
    engine = platform.removesuffix("_onnx")
    metrics = httpx.get(f"{served.info['predictor_rest']}/metrics").text
    info = [line for line in metrics.splitlines() if line.startswith("pneumoscope_engine_info{")]
    assert len(info) == 1 and f'engine="{engine}"' in info[0] and f'precision="{precision}"' in info[0], info
    assert 'selection="auto"' in info[0], info
    log = served.log.read_text()
    assert "engine selection (auto" in log and f"serving with {engine} {precision}" in log


def test_grpc_with_kserve_client(served, images, within):
    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def call():
        client = InferenceGRPCClient(served.info["grpc"], timeout=60)
        raw = InferInput("image", [2], "BYTES")
        raw.set_data_from_numpy(np.array(images[:2], dtype=np.object_))
        first = await client.infer(InferRequest("pneumonia", [raw]))
        contents = InferInput("image", [1], "BYTES", data=[b64(images[0])])
        second = await client.infer(InferRequest("pneumonia", [contents], parameters={"heatmap": True}))
        ready = await client.is_model_ready("pneumonia")
        await client.close()
        return first, second, ready

    first, second, ready = asyncio.run(call())
    assert ready and first.model_version == "1"
    probs = first.get_output_by_name("probability").as_numpy()
    rest = outputs(v2_json(served, images[:2]))["probability"]["data"]
    assert within(probs, rest, slice(0, 2))
    assert [o.name for o in second.outputs] == ["probability", "label", "threshold", "decision", "ood_score",
                                                "in_intended_use", "refer_reasons", "heatmap_png", "cam",
                                                "quality_flags", "lung_share", "lung_mask_source", "lung_mask",
                                                "input_box"]
    assert second.get_output_by_name("lung_mask").as_numpy().shape == (1, 128, 128)
    np.testing.assert_array_equal(second.get_output_by_name("input_box").as_numpy(), [[0, 0, 1, 1]])
    assert within(second.get_output_by_name("probability").as_numpy()[:1], rest[:1], [0])


def test_tritonclient_http_and_grpc(served, images, tmp_path, within):
    paths = []
    for i, data in enumerate(images[:2]):
        paths.append(tmp_path / f"x{i}.jpeg")
        paths[-1].write_bytes(data)
    http = served.rest.removeprefix("http://")
    result = subprocess.run([sys.executable, str(TESTS / "serving_triton_client.py"), http, served.info["grpc"],
                             *map(str, paths)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    rest = outputs(v2_json(served, images[:2]))["probability"]["data"]
    assert out["http_ready"] and out["grpc_ready"]
    assert within(out["http"]["probability"], rest, slice(0, 2))
    assert within(out["grpc"]["probability"], rest, slice(0, 2))
    assert out["grpc"]["model_version"] == "1" and out["http"]["model_version"] == "1"
    assert out["grpc"]["heatmap_formats"] == ["PNG", "PNG"] and out["grpc"]["cam_shape"] == [2, 4, 4]
    assert out["http_metadata"]["inputs"][0]["datatype"] == "BYTES"
    assert out["grpc_bad"] == "StatusCode.INVALID_ARGUMENT"


def test_cli_predict_all_protocols(served, images, tmp_path, capsys, within):
    from model.cli import main

    image = tmp_path / "xray.jpeg"
    image.write_bytes(images[0])
    reference = v1(served, images[0]).json()["predictions"][0]["probability"]
    for protocol in ("v1", "v2"):
        heatmap = tmp_path / f"{protocol}.png"
        assert main(["predict", str(image), "--url", served.rest, "--protocol", protocol, "--json",
                     "--heatmap", str(heatmap)]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert within([result["probability"]], [reference], [0]) and result["model_version"] == "1"
        assert Image.open(heatmap).format == "PNG"
    # gRPC goes through tritonclient, which cannot share this (kserve-importing) interpreter
    heatmap = tmp_path / "grpc.png"
    done = subprocess.run([sys.executable, "-m", "model.cli", "predict", str(image), "--url", served.info["grpc"],
                           "--protocol", "grpc", "--json", "--heatmap", str(heatmap)], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-1500:]
    assert within([json.loads(done.stdout)["probability"]], [reference], [0])
    assert Image.open(heatmap).format == "PNG"
    assert main(["predict", str(tmp_path / "missing.jpeg"), "--url", served.rest]) == 2
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image at all")
    assert main(["predict", str(bad), "--url", served.rest, "--protocol", "v1"]) == 2
    assert "not a JPEG, PNG or DICOM" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the decision every answer names: PNEUMONIA | NORMAL | REFER, the out-of-distribution score, the age rule

DECISION_FIELDS = ("decision", "ood_score", "in_intended_use", "refer_reasons")


def dicom_with_age(data: bytes, age: str | None, **tags) -> bytes:
    """The image as a DICOM file whose Patient's Age (0010,1010) is ``age`` (and ``tags``, e.g. ViewPosition)."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom_from_image(data)))
    if age is not None:
        dataset.PatientAge = age
    for key, value in tags.items():
        setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def offline_answers(served, images):
    """What the served version computes, offline: the engine and precision the predictor chose at load (its v2
    metadata says which), run here on the same stage-1 + stage-2 pixels in one batch, then the bundle's calibration,
    detector and decision rule."""
    from model.bundle import Bundle
    from model.engine_gate import GateSet
    from model.intended_use import DecisionRule
    from model.ood import OodDetector
    from model.preprocessing import load_resized, normalize
    from serving.engine import create_engine
    from serving.engine_selection import GRAPHS

    bundle = Bundle.load(served.bundle)
    platform = httpx.get(f"{served.info['predictor_rest']}/v2/models/pneumonia").json()["platform"]
    engine, _, precision = platform.partition("/")
    x = normalize(np.stack([load_resized(b, bundle.preprocess).pixels for b in images]), bundle.preprocess)
    logits, _, features = create_engine(engine.removesuffix("_onnx"), bundle.root / GRAPHS[precision], precision,
                                        1).run(x)
    # Served one image per call, batched here: the gate's tolerance (which every served engine x precision passed,
    # on its gate films, against fp32) bounds what batching and threads can move.
    tolerance = GateSet.load(bundle).max_ood_score_diff
    return bundle.probability(logits), OodDetector.load(bundle).scores(features), DecisionRule.from_meta(bundle.meta), \
        tolerance


def check_answers(answers: list[dict], probs, scores, rule, tolerance) -> None:
    """Served answers against the offline computation: the score within the gate's tolerance, and the decision
    the version's rule gives for the served probability and score (which equals the offline one away from edges)."""
    for answer, p, s in zip(answers, probs, scores, strict=True):
        assert answer["ood_score"] == pytest.approx(s, abs=tolerance + 1e-6)
        verdict = rule.decide(answer["probability"], answer["ood_score"], None)
        assert answer["decision"] == verdict.decision and answer["in_intended_use"] == verdict.in_intended_use
        assert [r["code"] for r in answer["refer_reasons"]] == [r.code for r in verdict.refer_reasons]
        assert all(r["text"] for r in answer["refer_reasons"])
        if answer["decision"] != "REFER":  # label semantics unchanged: the decision, when made, is the label
            assert answer["decision"] == answer["label"]
        if abs(s - 1) > 2 * tolerance and min(abs(p - rule.band_low), abs(p - rule.band_high)) > 1e-3:
            assert answer["decision"] == rule.decide(float(p), float(s), None).decision


def test_every_protocol_names_the_decision_of_the_served_version(served, images, tmp_path):
    probs, scores, rule, tolerance = offline_answers(served, images)
    v1_answers = v1(served, None, instances=[{"image": {"b64": b64(x)}} for x in images]).json()
    v1_predictions = v1_answers["predictions"]
    check_answers(v1_predictions, probs, scores, rule, tolerance)
    decisions = [p["decision"] for p in v1_predictions]
    assert "REFER" in decisions and set(decisions) - {"REFER"}, "the test bundle's band should refer some, not all"
    assert v1_answers["intended_use"]["profile"] == "test" and v1_answers["intended_use"]["age_limit_years"] == 18

    def v2_answers(reply) -> list[dict]:
        out = outputs(reply)
        assert out["in_intended_use"]["datatype"] == "BOOL" and out["ood_score"]["datatype"] == "FP32"
        return [{"probability": out["probability"]["data"][i], "label": out["label"]["data"][i],
                 "decision": out["decision"]["data"][i], "ood_score": out["ood_score"]["data"][i],
                 "in_intended_use": out["in_intended_use"]["data"][i],
                 "refer_reasons": json.loads(out["refer_reasons"]["data"][i])} for i in range(len(images))]

    as_json = v2_json(served, images)
    check_answers(v2_answers(as_json), probs, scores, rule, tolerance)
    assert json.loads(as_json.json()["parameters"]["intended_use"]) == v1_answers["intended_use"]
    binary = v2_binary(served.rest, images, parameters={"binary_data_output": False})
    check_answers(v2_answers(binary), probs, scores, rule, tolerance)
    for answer, v1_answer in zip(v2_answers(binary), v1_predictions):
        # another run of the served engine (wide or narrow, another stream): within the gate's score tolerance
        assert answer["ood_score"] == pytest.approx(v1_answer["ood_score"], abs=tolerance)
        assert [answer[k] for k in ("decision", "in_intended_use", "refer_reasons")] == \
            [v1_answer[k] for k in ("decision", "in_intended_use", "refer_reasons")]

    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def kserve_grpc():
        client = InferenceGRPCClient(served.info["grpc"], timeout=60)
        tensor = InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        reply = await client.infer(InferRequest("pneumonia", [tensor]))
        await client.close()
        return reply

    reply = asyncio.run(kserve_grpc())
    grpc_answers = [{"probability": float(reply.get_output_by_name("probability").as_numpy()[i]),
                     "label": reply.get_output_by_name("label").as_numpy()[i].decode(),
                     "decision": reply.get_output_by_name("decision").as_numpy()[i].decode(),
                     "ood_score": float(reply.get_output_by_name("ood_score").as_numpy()[i]),
                     "in_intended_use": bool(reply.get_output_by_name("in_intended_use").as_numpy()[i]),
                     "refer_reasons": json.loads(reply.get_output_by_name("refer_reasons").as_numpy()[i])}
                    for i in range(len(images))]
    check_answers(grpc_answers, probs, scores, rule, tolerance)

    # tritonclient's gRPC in a fresh process (its protobufs clash with kserve's in this one)
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"x{i}.jpeg")
        paths[-1].write_bytes(data)
    result = subprocess.run([sys.executable, str(TESTS / "serving_triton_client.py"),
                             served.rest.removeprefix("http://"), served.info["grpc"], *map(str, paths)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    triton = json.loads(result.stdout)["grpc"]
    check_answers([{k: triton[k][i] for k in ("probability", "label", *DECISION_FIELDS)} for i in range(len(images))],
                  probs, scores, rule, tolerance)
    assert triton["intended_use"] == v1_answers["intended_use"]


def test_a_patient_over_the_age_limit_is_referred_on_every_protocol(served, images, tmp_path, capsys):
    from model.cli import main

    film = images[-1]
    old, young, unknown = (dicom_with_age(film, age) for age in ("045Y", "004Y", None))
    batch = [old, young, unknown]
    predictions = v1(served, None, instances=[{"image": {"b64": b64(x)}} for x in batch]).json()["predictions"]
    over, child, plain = predictions
    assert over["decision"] == "REFER" and over["in_intended_use"] is False
    assert "age_over_limit" in [r["code"] for r in over["refer_reasons"]]
    # the age changes nothing else: the same film without an age, or a child's, gets the same answer otherwise
    assert "age_over_limit" not in [r["code"] for r in child["refer_reasons"]]
    assert {k: child[k] for k in DECISION_FIELDS} == {k: plain[k] for k in DECISION_FIELDS}
    assert over["probability"] == plain["probability"] and over["label"] == plain["label"]
    v2 = outputs(v2_binary(served.rest, batch, parameters={"binary_data_output": False}))
    assert v2["decision"]["data"][0] == "REFER" and v2["in_intended_use"]["data"][0] is False
    assert "age_over_limit" in v2["refer_reasons"]["data"][0] and "age_over_limit" not in v2["refer_reasons"]["data"][1]
    # the request parameter patient_age (years or a DICOM age string) applies to files without one, and wins
    stated = outputs(v2_json(served, [images[0]], {"patient_age": "030Y"}))
    assert "age_over_limit" in stated["refer_reasons"]["data"][0]
    overridden = v1(served, None, instances=[{"image": {"b64": b64(old)}}], parameters={"patient_age": 4})
    assert "age_over_limit" not in json.dumps(overridden.json()["predictions"][0]["refer_reasons"])
    refused = v2_json(served, [images[0]], {"patient_age": "forty-one"})
    assert refused.status_code == 400 and "patient_age" in refused.json()["error"]
    assert "forty-one" not in refused.json()["error"]  # a refused value is not echoed (nor logged)
    # gRPC (tritonclient, a fresh process) with the DICOM's own age, and with the parameter
    paths = [tmp_path / "old.dcm", tmp_path / "plain.jpeg"]
    paths[0].write_bytes(old)
    paths[1].write_bytes(images[0])
    result = subprocess.run([sys.executable, str(TESTS / "serving_triton_client.py"), "--age", "045Y",
                             served.rest.removeprefix("http://"), served.info["grpc"], *map(str, paths)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    triton = json.loads(result.stdout)
    assert triton["grpc"]["decision"][0] == "REFER" and not triton["grpc"]["in_intended_use"][0]
    assert "age_over_limit" not in [r["code"] for r in triton["grpc"]["refer_reasons"][1]]
    assert all("age_over_limit" in [r["code"] for r in reasons] for reasons in triton["grpc_with_age"]["refer_reasons"])
    # the CLI: a DICOM's own age, and --patient-age
    paths[1].write_bytes(young)
    assert main(["predict", str(paths[0]), "--url", served.rest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["decision"] == "REFER"
    assert main(["predict", str(paths[1]), "--url", served.rest, "--protocol", "v1", "--patient-age", "45"]) == 0
    printed = capsys.readouterr().out
    assert "REFER" in printed and "refer (age_over_limit)" in printed
    # no age reaches a log
    log = served.log.read_text()
    assert "045Y" not in log and "030Y" not in log and "forty-one" not in log


def test_a_lateral_film_is_referred_whatever_the_version_decided(served, images, within):
    """A DICOM whose View Position names a lateral or decubitus view, or whose View Code Sequence codes a lateral
    one: REFER, outside the intended use, reason view_not_frontal added by the transformer; the version's
    probability and its other reasons are kept. PA, an empty view and a JPEG are answered as before."""
    import highdicom as hd

    film = images[-1]
    lateral, decubitus, frontal, unstated = (dicom_with_age(film, None, ViewPosition=view)
                                             for view in ("LL", "RLD", "PA", ""))
    right_lateral = hd.sr.CodedConcept("399198007", "SCT", "right lateral")
    coded = dicom_with_age(film, None, ViewCodeSequence=[right_lateral])
    counted = _metric(httpx.get(f"{served.rest}/metrics").text, "pneumoscope_refer_reasons_total",
                      reason="view_not_frontal")
    batch = [lateral, decubitus, frontal, unstated, film, coded]
    answers = v1(served, None, instances=[{"image": {"b64": b64(x)}} for x in batch]).json()["predictions"]
    plain = answers[3]  # the same DICOM without a view
    assert "view_not_frontal" not in json.dumps(answers[4]["refer_reasons"])  # a JPEG says nothing of its view
    assert "as RL:" in answers[5]["refer_reasons"][-1]["text"]  # the coded view, named as View Position would
    for answer in [*answers[:2], answers[5]]:
        assert answer["decision"] == "REFER" and answer["in_intended_use"] is False, answer
        codes = [r["code"] for r in answer["refer_reasons"]]
        assert codes == [r["code"] for r in plain["refer_reasons"]] + ["view_not_frontal"], codes
        assert "frontal" in answer["refer_reasons"][-1]["text"]
        # the same pixels in another row of the batch: within the engine's bound for this film, on any CPU
        assert within([answer["probability"]], [plain["probability"]], [len(images) - 1])
    assert {k: answers[2][k] for k in DECISION_FIELDS} == {k: plain[k] for k in DECISION_FIELDS}
    v2 = outputs(v2_binary(served.rest, [lateral, frontal], parameters={"binary_data_output": False}))
    assert v2["decision"]["data"][0] == "REFER" and v2["in_intended_use"]["data"][0] is False
    assert "view_not_frontal" in v2["refer_reasons"]["data"][0]
    assert "view_not_frontal" not in v2["refer_reasons"]["data"][1]
    assert _metric(httpx.get(f"{served.rest}/metrics").text, "pneumoscope_refer_reasons_total",
                   reason="view_not_frontal") == counted + 4


# ---------------------------------------------------------------------------------------------------
# numerical checks against the PyTorch model

def _torch_reference(net, config, files):
    import torch

    from model.preprocessing import load_resized, normalize

    x = torch.from_numpy(normalize(np.stack([load_resized(b, config).pixels for b in files]), config))
    activations = {}
    hook = net.layer4.register_forward_hook(lambda _m, _i, out: activations.__setitem__("a", out))
    try:
        x.requires_grad_(False)
        logits = net(x).reshape(-1)
        features = activations["a"]
        grads = torch.autograd.grad(logits.sum(), features)[0]  # each logit depends only on its own image
    finally:
        hook.remove()
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    gradcam = torch.relu((alpha * features).sum(dim=1))
    return logits.detach().numpy(), gradcam.detach().numpy()


def predictor_pixels(url, images: list[np.ndarray], preprocessing=None):
    """Stage-1 pixels straight to the predictor (what the transformer sends), binary REST v2."""
    from model.preprocessing import PREPROCESSING_VERSION
    from serving.protocol import pack_images

    pixels, sizes = pack_images(images)
    raw = pixels.tobytes() + sizes.tobytes()
    header = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                          "parameters": {"binary_data_size": pixels.nbytes}},
                         {"name": "sizes", "datatype": "INT32", "shape": list(sizes.shape),
                          "parameters": {"binary_data_size": sizes.nbytes}}],
              "parameters": {"preprocessing": PREPROCESSING_VERSION if preprocessing is None else preprocessing}}
    head = json.dumps(header).encode()
    return httpx.post(f"{url}/v2/models/pneumonia/infer", content=head + raw, timeout=60,
                      headers={"content-type": "application/octet-stream",
                               "inference-header-content-length": str(len(head))})


def test_onnx_matches_pytorch_on_real_xrays(served, images, logit_bounds, within):
    """The served engine against the PyTorch network it was exported from: within float32 rounding for an fp32
    engine, within the gate's bound for the precision the selection chose otherwise (tests/numerics.py)."""
    from model.bundle import Bundle
    from model.preprocessing import decode

    bundle = Bundle.load(served.bundle)
    torch_logits, _ = _torch_reference(served.net, bundle.preprocess, images)
    reply = outputs(predictor_pixels(served.info["predictor_rest"], [decode(b).pixels for b in images]))
    assert (np.abs(np.array(reply["logit"]["data"]) - torch_logits) <= logit_bounds).all()
    everything = slice(0, len(images))
    assert within(reply["probability"]["data"], bundle.probability(torch_logits), everything)
    assert within(outputs(v2_json(served, images))["probability"]["data"], bundle.probability(torch_logits),
                  everything)


def test_heatmap_matches_gradcam_reference(served, images):
    """Grad-CAM by autograd on layer4 of the PyTorch model vs the CAM the stack serves: r >= 0.99."""
    import torch
    import torch.nn.functional as F

    from model.bundle import Bundle
    from serving.heatmap import heatmap

    config = Bundle.load(served.bundle).preprocess
    _, gradcam = _torch_reference(served.net, config, images)
    served_cam = np.array(outputs(v2_json(served, images, {"heatmap": True}))["cam"]["data"], dtype=np.float32)
    served_cam = served_cam.reshape(len(images), *gradcam.shape[1:])
    size = config.image_size
    compared = 0
    for reference, cam in zip(gradcam, served_cam):
        if reference.max() <= 0 or np.ptp(reference) == 0:
            continue  # nothing positive: both maps are empty
        ref = F.interpolate(torch.from_numpy(reference / reference.max())[None, None], size=(size, size),
                            mode="bilinear", align_corners=False)[0, 0].numpy()
        mine = heatmap(cam, size, size)
        r = np.corrcoef(ref.ravel(), mine.ravel())[0, 1]
        assert r >= 0.99, f"served heatmap correlates {r:.4f} with Grad-CAM"
        compared += 1
    assert compared >= 3


# ---------------------------------------------------------------------------------------------------
# metrics and batching

def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if line[len(name)] in "{ ":
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_queue_and_run_side_by_side_one_per_stream(served, images):
    from serving.inputs import decode_upload
    from serving.predictor_client import PredictorClient
    from serving.settings import ServingSettings

    predictor = served.info["predictor_rest"]
    url = f"{predictor}/metrics"
    # Straight to the predictor, as the transformer calls it: the transformer's admission (by expected wait) may
    # hold requests back so that the predictor never sees two at once, which is its job, not the batcher's.
    pixels = [decode_upload(data, ServingSettings()).pixels for data in images[:4]]
    client = PredictorClient("127.0.0.1:1", "v2", "pneumonia")

    def infer(i: int):
        body, length = client._request([pixels[i % len(pixels)]], f"batch-{i}").to_rest()
        return httpx.post(f"{predictor}/v2/models/pneumonia/infer", content=body, timeout=60,
                          headers={"content-type": "application/octet-stream",
                                   "inference-header-content-length": str(length)})

    before = httpx.get(url).text
    # 32 requests in flight against 2 single-threaded engine streams (PNEUMOSCOPE_THREADS=2): they queue, and each
    # stream takes one at a time (serving.batching: a batch gains nothing on a single-threaded CPU stream).
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(infer, range(32)))
    assert all(r.status_code == 200 for r in replies), replies[0].text
    after = httpx.get(url).text
    calls = _metric(after, "pneumoscope_batch_size_count") - _metric(before, "pneumoscope_batch_size_count")
    rows = _metric(after, "pneumoscope_batch_size_sum") - _metric(before, "pneumoscope_batch_size_sum")
    narrow = (_metric(after, "pneumoscope_engine_runs_total", mode="narrow")
              - _metric(before, "pneumoscope_engine_runs_total", mode="narrow"))
    assert rows == 32 and calls == 32, f"32 concurrent requests took {calls:.0f} engine calls for {rows:.0f} images"
    # (the first ones may run wide, on both threads, while the batcher's recent occupancy is still below one)
    assert narrow >= 1, "no queued request ran on the side-by-side streams"


def test_metrics_on_both_processes(served, images, served_precision):
    v1(served, b"definitely not an image")
    transformer = httpx.get(f"{served.rest}/metrics").text
    for name in ("request_preprocess_seconds_count", "request_predict_seconds_count",
                 "request_postprocess_seconds_count", "request_explain_seconds_count"):
        assert _metric(transformer, name, model_name="pneumonia") > 0, name
    assert _metric(transformer, "pneumoscope_input_rejections_total", reason="not_an_image") >= 1
    assert "pneumoscope_model_info{" not in transformer and "pneumoscope_inflight_requests 0.0" in transformer
    predictor = httpx.get(f"{served.info['predictor_rest']}/metrics").text
    # the predictor decides, so it counts the answers, by the version that computed them
    assert _metric(predictor, "pneumoscope_predictions_total", model_version="1", label="PNEUMONIA") > 0
    assert _metric(predictor, "pneumoscope_predictions_total", model_version="1", label="NORMAL") > 0
    assert _metric(predictor, "pneumoscope_probability_count", model_version="1") > 0
    assert _metric(predictor, "pneumoscope_probability_bucket", le="1.0") > 0
    assert _metric(predictor, "request_predict_seconds_count", model_name="pneumonia") > 0
    assert _metric(predictor, "pneumoscope_model_info", model_version="1", role="predictor",
                   precision=served_precision) == 1
    assert _metric(predictor, "pneumoscope_warmup_seconds") > 0
    assert _metric(predictor, "pneumoscope_engine_seconds_count") > 0


# ---------------------------------------------------------------------------------------------------
# bad input: a 4xx with a message, never a 500, and the next good request succeeds

def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom_without_pixels() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("empty.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.Modality = "Test^NoPixels", "CR"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _colour_photo() -> bytes:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:300, 0:400]
    photo = np.stack([xx * 255 // 400, yy * 255 // 300, 255 - xx * 255 // 400], axis=2).astype(np.uint8)
    photo = np.clip(photo.astype(int) + rng.integers(-20, 20, photo.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _v1_image(data):
    return lambda served: v1(served, data)


BAD_INPUTS = {
    "not_an_image": (_v1_image(b"GIF? no. Just some text that is not an image." * 5), 400, "not_an_image"),
    "truncated_jpeg": (lambda s: v1(s, (XRAY_FULL / "train" / "NORMAL").glob("*").__next__().read_bytes()[:5000]),
                       400, "corrupt"),
    "decompression_bomb": (lambda s: v1(s, _bomb()), 413, "too_large"),
    "empty_body_v1": (lambda s: httpx.post(f"{s.rest}/v1/models/pneumonia:predict", content=b""), 400, "empty"),
    "empty_body_v2": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", content=b""), 400, "empty"),
    "empty_image": (_v1_image(b""), 400, "empty"),
    "invalid_base64": (lambda s: v1(s, None, instances=[{"image": {"b64": "@@@ not base64 @@@"}}]), 400,
                       "invalid_base64"),
    "invalid_json": (lambda s: httpx.post(f"{s.rest}/v1/models/pneumonia:predict", content=b"{not json",
                                          headers={"content-type": "application/json"}), 400, None),
    "no_instances": (lambda s: v1(s, None, instances="nope"), 400, "invalid_request"),
    "v2_wrong_datatype": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", json={"inputs": [
        {"name": "image", "datatype": "FP32", "shape": [1], "data": [0.5]}]}), 400, "invalid_tensor"),
    "v2_wrong_shape": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [3], "data": ["aGVsbG8="]}]}), 400, "invalid_tensor"),
    "v2_2d_shape": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["aGVsbG8="]}]}), 400, "invalid_tensor"),
    "v2_wrong_name": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", json={"inputs": [
        {"name": "picture", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}), 400, "invalid_tensor"),
    "v2_malformed": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", json={"inputs": [{"x": 1}]}),
                     422, "invalid_request"),
    "v2_binary_overrun": (lambda s: httpx.post(f"{s.rest}/v2/models/pneumonia/infer", content=b'{"inputs":[]}xx',
                                               headers={"inference-header-content-length": "999"}), 400,
                          "invalid_request"),
    "payload_over_limit": (lambda s: httpx.post(f"{s.rest}/v1/models/pneumonia:predict",
                                                content=b"x" * (MAX_PAYLOAD + 1)), 413, "too_large"),
    "too_many_images": (lambda s: v1(s, None, instances=[{"image": {"b64": "aGVsbG8="}}] * 33), 413,
                        "too_many_images"),
    "dicom_without_pixels": (lambda s: v1(s, _dicom_without_pixels()), 400, "no_pixel_data"),
    "colour_photograph": (lambda s: v1(s, _colour_photo()), 422, "not_grayscale"),
    "blank_frame": (lambda s: v1(s, _png(np.full((256, 256), 30, np.uint8))), 422, "low_contrast"),
    "unknown_model": (lambda s: httpx.post(f"{s.rest}/v1/models/other:predict", json={"instances": []}), 404, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_service_continues(served, images, case):
    send, status, reason = BAD_INPUTS[case]
    response = send(served)
    assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
    body = response.json()
    message = body.get("error") or body.get("detail")
    assert message, f"{case}: no error message in {body}"
    if reason:
        assert body.get("reason") == reason, body
    assert_good(served, images)


def test_bad_input_over_grpc_is_invalid_argument(served, images):
    import asyncio

    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def call():
        client = InferenceGRPCClient(served.info["grpc"], timeout=30, retries=0)
        tensor = InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        try:
            await client.infer(InferRequest("pneumonia", [tensor]))
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        finally:
            await client.close()

    code, details = asyncio.run(call())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a JPEG" in details
    assert_good(served, images)


def _grpc(target: str, call):
    """Run ``call(stub)`` against a gRPC v2 endpoint; returns (status code name, details) or ("OK", reply)."""
    import asyncio

    import grpc
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                return "OK", await call(GRPCInferenceServiceStub(channel))
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details()

    return asyncio.run(run())


def test_no_control_plane_endpoint_on_either_server(served, images):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    processes = {"transformer": (served.rest, served.info["grpc"]),
                 "predictor": (served.info["predictor_rest"], served.info["predictor_grpc"])}
    for role, (rest, grpc_target) in processes.items():
        for path in ("/v2/repository/models/pneumonia/unload", "/v2/repository/models/pneumonia/load",
                     "/v2/repository/index"):
            response = httpx.post(f"{rest}{path}", json={}, timeout=30)
            assert response.status_code == 404, (role, path, response.status_code, response.text)
        for method, message in (("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="pneumonia")),
                                ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="pneumonia"))):
            code, _ = _grpc(grpc_target, lambda stub: getattr(stub, method)(message, timeout=30))
            assert code == "UNIMPLEMENTED", (role, method, code)
        assert httpx.get(f"{rest}/v2/models/pneumonia/ready", timeout=30).status_code == 200
    assert_good(served, images)  # the model is still loaded and serving


def test_client_input_never_gets_a_5xx(served, images):
    """Reproductions of the review's 5xx cases: each is now a 4xx with one line, and service continues."""
    transformer, predictor = served.rest, served.info["predictor_rest"]
    header_bytes = "h\u00e9llo \u00fcber".encode("utf-8")
    cases = {
        "non-ASCII x-request-id": lambda: httpx.post(f"{transformer}/v1/models/pneumonia:predict", timeout=30,
                                                     json={"instances": [{"image": {"b64": b64(images[0])}}]},
                                                     headers={"x-request-id": header_bytes}),
        "shape with a string (transformer)": lambda: _binary_raw(transformer, {"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": ["1e3", 1, 224, 224],
             "parameters": {"binary_data_size": 4}}]}, b"\0\0\0\0"),
        "shape with a string (predictor)": lambda: _binary_raw(predictor, {"inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": ["1e3", 1, 224, 224],
             "parameters": {"binary_data_size": 4}}], "parameters": {"preprocessing": 2}}, b"\0\0\0\0"),
        "object id (binary)": lambda: _binary_raw(transformer, {"id": {"a": 1}, "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": 4 + len(images[0])}}]},
            len(images[0]).to_bytes(4, "little") + images[0]),
        "object id (JSON)": lambda: httpx.post(f"{transformer}/v2/models/pneumonia/infer", timeout=30, json={
            "id": {"a": 1},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(images[0])]}]}),
        "bad timeout header": lambda: httpx.post(f"{transformer}/v1/models/pneumonia:predict", timeout=30,
                                                 json={"instances": [{"image": {"b64": b64(images[0])}}]},
                                                 headers={"x-request-timeout-ms": "-5"}),
        "predictor without preprocessing": lambda: predictor_pixels(predictor, [np.full((64, 64), 99, np.uint8)],
                                                                    preprocessing="none"),
        "predictor with oversized pixels": lambda: predictor_pixels(predictor, [np.zeros((600, 64), np.uint8)]),
        # the predictor takes what the transformer can send (32 x 512 x 512 bytes), not 256 MiB of JSON
        "predictor body over its hop's limit": lambda: httpx.post(
            f"{predictor}/v2/models/pneumonia/infer", content=b"[" + b"0," * 4_500_000 + b"0]", timeout=60,
            headers={"content-type": "application/json"}),
    }
    for case, send in cases.items():
        response = send()
        assert 400 <= response.status_code < 500, f"{case}: {response.status_code} {response.text[:300]}"
        body = response.json()
        assert body.get("error") and body.get("reason"), f"{case}: {body}"
        assert "0x" not in response.text and "Traceback" not in response.text, f"{case}: {response.text[:300]}"
    # a tracing header gRPC metadata cannot carry is not forwarded (it was a 500), the request is served
    traced = httpx.post(f"{transformer}/v1/models/pneumonia:predict", timeout=60, headers={
        "traceparent": header_bytes}, json={"instances": [{"image": {"b64": b64(images[0])}}]})
    assert traced.status_code == 200, traced.text
    assert_good(served, images)


def _binary_raw(url: str, header: dict, raw: bytes):
    head = json.dumps(header).encode()
    return httpx.post(f"{url}/v2/models/pneumonia/infer", content=head + raw, timeout=30,
                      headers={"content-type": "application/octet-stream",
                               "inference-header-content-length": str(len(head))})


def test_a_rejected_grpc_request_is_logged_once_and_counted_once(served, images):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    before = _metric(httpx.get(f"{served.rest}/metrics").text, "pneumoscope_input_rejections_total",
                     reason="not_an_image")
    request = pb.ModelInferRequest(model_name="pneumonia", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"no image"]))])
    code, details = _grpc(served.info["grpc"], lambda stub: stub.ModelInfer(
        request, timeout=30, metadata=(("x-request-id", "grpc-reject-4711"),)))
    assert code == "INVALID_ARGUMENT" and "not a JPEG" in details
    after = _metric(httpx.get(f"{served.rest}/metrics").text, "pneumoscope_input_rejections_total",
                    reason="not_an_image")
    assert after == before + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "grpc-reject-4711" not in served.log.read_text():
        time.sleep(0.2)
    lines = served.log.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if "grpc-reject-4711" in line]
    assert len(hits) == 1 and " INFO " in lines[hits[0]], [lines[i] for i in hits]
    assert not any("Traceback" in line for line in lines[hits[0]:hits[0] + 3])


def test_heatmap_is_drawn_on_the_decoded_pixels_keeping_the_aspect_ratio(served, images):
    original = Image.open(io.BytesIO(images[-1])).size  # a full-resolution X-ray
    explained = v1(served, images[-1], verb="explain").json()["predictions"][0]
    heatmap = Image.open(io.BytesIO(base64.b64decode(explained["heatmap_png"])))
    assert 256 <= max(heatmap.size) <= 512  # the decoded canvas: a JPEG drafted to 256-511 px
    assert abs(heatmap.size[0] / heatmap.size[1] - original[0] / original[1]) < 0.01


# ---------------------------------------------------------------------------------------------------
# configuration errors, precision, outages, shutdown

def test_serve_refuses_bad_model_uri_and_busy_port(served, capsys, monkeypatch):
    from model.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.tracking_uri)
    port = free_port_pair()
    assert main(["serve", "--model", "models:/pneumonia@nosuchalias", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pneumoscope: error:") and "does not exist" in err[-1]
    assert main(["serve", "--model", "/no/such/bundle", "--port", str(port)]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(served.bundle), "--port", str(port)]) == 2
    assert "give its expected bundle digest with --sha256" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["serve", "--model", str(served.bundle), "--sha256", "0" * 64, "--port", str(port)]) == 2
    assert "does not match the expected" in capsys.readouterr().err
    busy = int(served.rest.rsplit(":", 1)[1])
    assert main(["serve", "--model", str(served.bundle), "--port", str(busy)]) == 2
    assert "is in use" in capsys.readouterr().err


def test_precision_flag_selects_the_graph(served):
    from serving.engine import native_bf16
    from serving.predictor import PneumoniaPredictor
    from serving.settings import ServingSettings

    from model.bundle import Bundle

    chosen, rows = {}, {}
    digest = Bundle.load(served.bundle).sha256
    for precision in ("auto", "fp32", "int8"):
        model = PneumoniaPredictor("pneumonia", str(served.bundle), ServingSettings(
            engine="auto", precision=precision, threads=1, max_batch_size=2, model_sha256=digest,
            engine_timing_s=0.2))
        assert model.load() and model.ready
        chosen[precision], rows[precision] = model.precision, model.engine.table
    # the test bundle's int8 graph did not pass its gate, so "auto" serves fp32, or bf16 where OpenVINO has it
    # natively and it was faster and passed the accuracy gate
    assert {p for p in chosen if chosen[p] == p} == {"fp32", "int8"}
    assert {row["precision"] for row in rows["auto"]} == {"fp32"} | ({"bf16"} if native_bf16() else set())
    assert chosen["auto"] == next(row["precision"] for row in rows["auto"] if row["status"] == "chosen")


def test_predictor_down_gives_503_then_recovers_on_the_pinned_version(served, images):
    # the alias moves on; the running stack keeps serving the version it resolved at start
    assert register(served.bundle, served.tracking_uri) == "2"
    os.kill(served.info["pids"]["predictor"], signal.SIGKILL)
    time.sleep(0.2)
    started = time.perf_counter()
    response = v1(served, images[0], timeout=30)
    elapsed = time.perf_counter() - started
    assert response.status_code == 503, response.text
    assert response.json()["reason"] == "predictor_unavailable" and elapsed < 3.0, elapsed
    assert "127.0.0.1" not in response.text and response.headers["retry-after"] == "1"  # no internal address
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the stack restarts the predictor; the transformer reconnects
        response = v1(served, images[0], timeout=30)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        time.sleep(0.5)
    assert response.status_code == 200, "the transformer did not recover"
    assert response.json()["predictions"][0]["model_version"] == "1"


def test_sigterm_stops_both_processes(served):
    from serving.stack import port_free

    pids = served.info["pids"]
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0
    ports = [int(served.rest.rsplit(":", 1)[1]), int(served.info["predictor_rest"].rsplit(":", 1)[1])]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(port_free(p) for p in ports):
        time.sleep(0.2)
    assert all(port_free(p) for p in ports)
    with pytest.raises(ProcessLookupError):
        os.kill(pids["transformer"], 0)
