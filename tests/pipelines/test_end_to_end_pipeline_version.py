"""End to end: serve the model version the training pipeline itself registered (the pyfunc layout
``make demo`` produces, not a hand-built folder) with ``pneumoscope serve``, and check the serving claims
on it through real processes:

- REST v2 and gRPC v2 at the transformer give the pyfunc model's probabilities, naming version 1;
- the transformer -> predictor link over REST v2 answers exactly as the link over gRPC;
- a DICOM and the JPEG it was made from get the same probability;
- CLI flags win over PNEUMOSCOPE_* environment variables (and those over the defaults);
- a tampered bundle is refused at serve time; the predictor is not ready before its warm-up.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving_fixtures import dicom_from_image, serve_until_ready, xray_files
from test_pipeline_fixtures import free_port, stop_process

pytestmark = pytest.mark.integration

VERSION_URI = "models:/pneumonia/1"


def serve(tracking_uri: str, model: str, workdir: Path, *flags: str, env: dict | None = None):
    """``pneumoscope serve`` as a user runs it; returns (process, READY info) or fails with its log."""
    from serving_fixtures import free_port_pair

    port = free_port_pair()
    log = workdir / f"serve-{port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMOSCOPE_")}
    environment.update(MLFLOW_TRACKING_URI=tracking_uri, PNEUMOSCOPE_THREADS="1", PYTHONUNBUFFERED="1",
                       **(env or {}))
    return serve_until_ready(["--model", model, "--port", str(port), *flags], environment, workdir, log)


@pytest.fixture(scope="module")
def stacks(pipeline_first_run, tmp_path_factory):
    """Two stacks on version 1: one whose flags override conflicting environment variables (gRPC link,
    fp32), one configured by environment variables alone (REST v2 link, fp32: the links are compared on the
    same precision)."""
    uri = pipeline_first_run["tracking_uri"]
    workdir = tmp_path_factory.mktemp("e2e")
    grpc_link, grpc_info = serve(uri, VERSION_URI, workdir, "--predictor-protocol", "grpc-v2", "--precision", "fp32",
                                 env={"PNEUMOSCOPE_PREDICTOR_PROTOCOL": "v2", "PNEUMOSCOPE_PRECISION": "int8"})
    try:
        rest_link, rest_info = serve(uri, VERSION_URI, workdir, env={"PNEUMOSCOPE_PREDICTOR_PROTOCOL": "v2",
                                                                     "PNEUMOSCOPE_PRECISION": "fp32"})
    except BaseException:
        stop_process(grpc_link, 30)
        raise
    yield {"grpc": grpc_info, "rest": rest_info, "workdir": workdir, "tracking_uri": uri,
           "home": pipeline_first_run["home"]}
    stop_process(grpc_link, 30)
    stop_process(rest_link, 30)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [f.read_bytes() for f in xray_files(per_class=3, offset=300)]


def test_flags_win_over_environment_variables(stacks):
    grpc_info, rest_info = stacks["grpc"], stacks["rest"]
    # PNEUMOSCOPE_PRECISION=int8 would not even start: the pipeline registered no int8 graph
    assert grpc_info["predictor_protocol"] == "grpc-v2" and grpc_info["precision"] == "fp32"
    assert rest_info["predictor_protocol"] == "v2" and rest_info["precision"] == "fp32"  # env over the default
    for info in (grpc_info, rest_info):
        assert info["model_uri"] == VERSION_URI and info["model_version"] == "1"


def predict_in_a_fresh_process(url: str, images: list[bytes], protocol: str) -> list[dict]:
    """``serving.client.predict`` in its own interpreter: its gRPC path imports tritonclient, whose protobufs
    register the same ``inference.*`` symbols as kserve's, so importing it here would break every later test
    that imports kserve in this pytest process."""
    code = ("import base64, json, sys; from serving.client import predict; "
            "url, protocol, *images = json.load(sys.stdin); "
            "print(json.dumps([predict(url, base64.b64decode(i), protocol) for i in images]))")
    payload = json.dumps([url, protocol, *(base64.b64encode(i).decode() for i in images)])
    result = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_pipeline_version_over_rest_and_grpc_matches_the_pyfunc_model(stacks, images):
    import mlflow.pyfunc
    import pandas as pd

    # models:/ resolves through the registry URI, which MLflow keeps apart from the tracking URI: an earlier
    # in-process model.registry.connect() (another test's store) leaves it set, and models:/pneumonia/1 would
    # then be that store's version 1. Pin both to this pipeline's store, and put both back afterwards.
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = stacks["tracking_uri"]
    try:
        mlflow.set_tracking_uri(stacks["tracking_uri"])
        mlflow.set_registry_uri(stacks["tracking_uri"])
        pyfunc = mlflow.pyfunc.load_model(VERSION_URI)
        expected = [p["probability"] for p in pyfunc.predict(pd.DataFrame({"image": images}))]
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        if previous[2] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous[2]
    # Both stacks serve fp32 (ONNX Runtime or OpenVINO, chosen by timing), the pyfunc model ONNX Runtime with
    # other threads and batches: float32 rounding apart, at most (tests/numerics.py).
    allowed = _fp32_probability_bound(stacks, images, np.array(expected))
    assert (np.abs(np.diff(np.sort(expected))) > 2 * allowed.max()).any(), "the model gives every image one score"
    answers = {}
    for link in ("grpc", "rest"):
        info = stacks[link]
        for protocol, url in (("v2", info["rest"]), ("grpc", info["grpc"])):
            results = predict_in_a_fresh_process(url, images, protocol)
            assert all(r["model_version"] == "1" and r["model_name"] == "pneumonia" for r in results)
            answers[(link, protocol)] = np.array([r["probability"] for r in results])
            assert (np.abs(answers[(link, protocol)] - expected) <= allowed).all(), (link, protocol)
            threshold = results[0]["threshold"]
            assert [r["label"] for r in results] == ["PNEUMONIA" if p >= threshold else "NORMAL" for p in
                                                    answers[(link, protocol)]]
    # the transformer's own protocols reach one predictor: identical; the REST v2 link to the predictor answers
    # as the gRPC link, up to the two stacks' engines (each chose its fp32 engine by timing)
    for link in ("grpc", "rest"):
        assert list(answers[(link, "v2")]) == list(answers[(link, "grpc")])
    assert (np.abs(answers[("rest", "v2")] - answers[("grpc", "v2")]) <= allowed).all()


def _fp32_probability_bound(stacks, images: list[bytes], probabilities: np.ndarray) -> np.ndarray:
    """numerics.network_logit_bound of the pipeline's own network (its checkpoint), through the sigmoid."""
    from model.network import LogitAndCam
    from model.preprocessing import load_resized, normalize
    from model.registry import fetch_model
    from model.training import load_checkpoint
    from numerics import network_logit_bound, probability_bound

    # the first run's: test_pipeline_local may run the pipeline again in the same home later
    checkpoints = sorted(Path(stacks["home"]).rglob("checkpoint.pt"), key=lambda path: path.stat().st_mtime)
    assert checkpoints, f"no checkpoint of the pipeline run under {stacks['home']}"
    bundle, _ = fetch_model(VERSION_URI, str(stacks["workdir"] / "bound"), stacks["tracking_uri"])
    x = normalize(np.stack([load_resized(i, bundle.preprocess).pixels for i in images]), bundle.preprocess)
    head = LogitAndCam(load_checkpoint(checkpoints[0])[0]).eval()
    return probability_bound(probabilities, network_logit_bound(head, x), bundle.temperature)


def test_dicom_and_its_jpeg_get_the_same_probability(stacks, images):
    from serving.client import predict

    url = stacks["grpc"]["rest"]
    for jpeg in images:
        from_jpeg = predict(url, jpeg, "v2")["probability"]
        from_dicom = predict(url, dicom_from_image(jpeg), "v2")["probability"]
        # Not a rounding bound: the JPEG path decodes in the DCT domain at reduced size, the DICOM carries the
        # full pixels, so the network sees slightly different images. 0.01 is the product's claim for that
        # (a hundredth of probability: no label near a sensible threshold changes on it).
        assert from_dicom == pytest.approx(from_jpeg, abs=0.01)


def _digest(bundle: Path) -> str:
    from model.bundle import Bundle

    return Bundle.load(bundle, verify=False).sha256


def _bundle_copy(tiny_model, dest: Path) -> Path:
    """A complete bundle as ``evaluate`` writes it (the claims' tiny model), copied to be altered."""
    shutil.copytree(tiny_model.bundle, dest / "bundle")
    return dest / "bundle"


@pytest.mark.parametrize("tamper, message", [("onnx", "sha256 mismatch for model.onnx"),
                                             ("threshold", "does not match the expected")])
def test_a_tampered_bundle_is_refused_at_serve_time(tiny_model, tmp_path, tamper, message):
    """Served with the digest the registry recorded for the untouched bundle (a folder needs one)."""
    bundle = _bundle_copy(tiny_model, tmp_path)
    digest = _digest(bundle)
    if tamper == "onnx":
        with (bundle / "model.onnx").open("r+b") as fh:
            fh.seek(4000)
            fh.write(b"\x13\x37")
    else:
        meta = json.loads((bundle / "pneumoscope.json").read_text())
        meta["threshold"] = 0.01  # every X-ray would become PNEUMONIA
        (bundle / "pneumoscope.json").write_text(json.dumps(meta))
    log = tmp_path / "serve.log"
    result = subprocess.run([str(Path(sys.executable).parent / "pneumoscope"), "serve", "--model", str(bundle),
                             "--sha256", digest, "--no-web", "--port", str(free_port()), "--log-file", str(log),
                             "--startup-timeout", "120"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PNEUMOSCOPE_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "READY" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pneumoscope: error:") and message in last, last


def _nan_on_blank_bundle(dest: Path, source: Path) -> Path:
    """A valid, hashed bundle whose graph is finite on real X-rays but NaN on a blank frame (log of a zero
    variance), like a broken export: the warm-up must catch it before the predictor says ready."""
    import onnx
    from onnx import TensorProto, helper

    from model.bundle import write_bundle

    meta = json.loads((source / "pneumoscope.json").read_text())
    size = meta["preprocess"]["image_size"]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])
    logit = helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", size, size])
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Sub", ["image", "mean"], ["centred"]),
             helper.make_node("Mul", ["centred", "centred"], ["squares"]),
             helper.make_node("ReduceMean", ["squares"], ["variance"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Log", ["variance"], ["logit"]),
             helper.make_node("Squeeze", ["image", "channel"], ["cam"])]
    inits = [helper.make_tensor("channel", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "nan_on_blank", [x], [logit, cam], inits)
    dest.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(dest / "model.onnx"))
    # No engine gate set (its images were the good graph's): served as a bundle from before the gate, so the
    # warm-up is what must catch it.
    # Nor an out-of-distribution detector or a lung model: their files were the good bundle's.
    keep = {k: v for k, v in meta.items()
            if k not in ("files", "bundle_sha256", "format", "engine_gate", "intended_use", "lung_segmentation")}
    keep["int8"] = {"accepted": False, "reason": "test"}
    write_bundle(dest, keep)
    return dest


def _predictor(bundle: Path, port: int, grpc_port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.predictor_main", "--model_uri", str(bundle),
                             "--sha256", _digest(bundle), "--http_port", str(port), "--grpc_port", str(grpc_port), "--bind", "127.0.0.1"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PNEUMOSCOPE_THREADS": "1"})


def _poll_ready(process, port: int, timeout: float = 180.0) -> tuple[bool, str]:
    """Poll readiness until 200 or exit; on 200, read the metrics at that moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/models/pneumonia/ready", timeout=1).status_code == 200:
                return True, httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False, ""


def test_the_predictor_is_not_ready_before_its_warm_up(tiny_model, tmp_path):
    good = _bundle_copy(tiny_model, tmp_path)
    process = _predictor(good, free_port(), free_port(), tmp_path / "good.log")
    port = int(process.args[process.args.index("--http_port") + 1])
    try:
        ready, metrics = _poll_ready(process, port)
        assert ready, (tmp_path / "good.log").read_text()[-2000:]
        warmup = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("pneumoscope_warmup_seconds ")]
        assert warmup and warmup[0] > 0, "ready before the warm-up inference ran"
    finally:
        stop_process(process)

    broken = _nan_on_blank_bundle(tmp_path / "broken", good)
    process = _predictor(broken, free_port(), free_port(), tmp_path / "broken.log")
    port = int(process.args[process.args.index("--http_port") + 1])
    try:
        ready, _ = _poll_ready(process, port, timeout=120)
        assert not ready, "a predictor whose warm-up inference fails must never report ready"
        assert process.wait(60) != 0
        assert "warm-up" in (tmp_path / "broken.log").read_text()
    finally:
        stop_process(process)
