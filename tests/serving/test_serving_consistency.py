"""Answers stay one version's during a canary (issue 8, point 1), on real processes.

Two registered versions that differ in image size (128 vs 224 px) and threshold are served side by
side: predictor A (version 1) and predictor B (version 2), each with its own transformer, then every
transformer cross-paired with the other side's predictor (what a traffic split between revisions can
do). Every answer must equal what its predictor's version gives when served alone, name that version,
and equal the version's own computation from the bundle (the training code path + ONNX Runtime).
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from numerics import U32, engine_logit_bound, probability_bound
from serving_fixtures import (XRAY_224, XRAY_FULL, register, require_data, shared_bundle,
                              spawn_server, stop_server, wait_ready, xray_files)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    require_data()
    root = tmp_path_factory.mktemp("canary")
    small, small_net = shared_bundle(128, seed=0)
    large, large_net = shared_bundle(224, seed=1, int8=False)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    assert register(small, tracking_uri) == "1" and register(large, tracking_uri, alias="challenger") == "2"
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PNEUMOSCOPE_THREADS": "1"}
    processes = []
    try:
        from serving.stack import free_port, port_free

        taken: set[int] = set()

        def pair() -> int:
            """P and P+1, both free and not given out yet."""
            while True:
                port = free_port(taken)
                if port + 1 not in taken and port_free(port + 1):
                    taken.update((port, port + 1))
                    return port

        ports = {}
        for version in ("1", "2"):  # both predictors start at once, then the four transformers
            http = pair()
            ports[version] = http, http + 1
            processes.append(spawn_server(
                ["serving.predictor_main", "--model_uri", f"models:/pneumonia/{version}", "--http_port", str(http),
                 "--grpc_port", str(http + 1), "--bind", "127.0.0.1"], root / f"predictor{version}.log", env))
        for process, version in zip(processes, ("1", "2")):
            wait_ready(process, f"http://127.0.0.1:{ports[version][0]}/v2/models/pneumonia/ready")
        predictors = {v: f"127.0.0.1:{grpc}" for v, (_, grpc) in ports.items()}
        urls = {}
        # deployed as pairs, then crossed: the transformer of side A in front of predictor B and vice versa
        for name, version in (("t1", "1"), ("t2", "2"), ("t1-to-2", "2"), ("t2-to-1", "1")):
            urls[name] = http = pair()
            processes.append(spawn_server(
                ["serving.transformer_main", "--predictor_host", predictors[version], "--http_port", str(http),
                 "--grpc_port", str(http + 1), "--bind", "127.0.0.1"], root / f"{name}.log"))
        for process, http in zip(processes[2:], urls.values()):
            wait_ready(process, f"http://127.0.0.1:{http}/v2/models/pneumonia/ready")
        url = {name: f"http://127.0.0.1:{http}" for name, http in urls.items()}
        yield {"alone": {"1": url["t1"], "2": url["t2"]}, "crossed": {"2": url["t1-to-2"], "1": url["t2-to-1"]},
               "bundles": {"1": small, "2": large}, "nets": {"1": small_net, "2": large_net},
               "predictors": predictors, "predictor_rest": {v: f"http://127.0.0.1:{h}" for v, (h, _) in ports.items()}}
    finally:
        for process in processes:  # all at once: each drains on its own
            if process.poll() is None:
                process.terminate()
        for process in processes:
            stop_server(process)


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    return ([f.read_bytes() for f in xray_files(per_class=3, root=XRAY_224, offset=40)]
            + [f.read_bytes() for f in xray_files(per_class=2, root=XRAY_FULL, offset=10)])


def ask(url: str, images: list[bytes]) -> list[dict]:
    body = {"instances": [{"image": {"b64": base64.b64encode(i).decode()}} for i in images]}
    response = httpx.post(f"{url}/v1/models/pneumonia:predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def offline(bundle_dir, images: list[bytes]) -> tuple[np.ndarray, float, np.ndarray]:
    """The version's own answer, without any server: training's preprocessing + its ONNX graph + calibration.
    Also returns the network's input, for the rounding bounds."""
    from model.bundle import Bundle, make_session, run_images
    from model.preprocessing import load_resized, normalize

    bundle = Bundle.load(bundle_dir)
    pixels = np.stack([load_resized(i, bundle.preprocess).pixels for i in images])
    logits = run_images(make_session(bundle.onnx_path("fp32"), threads=1), pixels, bundle.preprocess)
    return bundle.probability(logits), bundle.threshold, normalize(pixels, bundle.preprocess)


def served_against_offline(sides, version: str, x: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """How far the predictor's answers may lie from ``offline``: the bound of the engine and precision its
    selection chose (tests/numerics.py), carried through the calibrated sigmoid."""
    from model.bundle import Bundle
    from model.engine_gate import GateSet
    from model.network import LogitAndCam

    platform = httpx.get(f"{sides['predictor_rest'][version]}/v2/models/pneumonia", timeout=30).json()["platform"]
    precision = platform.partition("/")[2]
    bundle = Bundle.load(sides["bundles"][version])
    head = LogitAndCam(sides["nets"][version]).eval()
    logit_bound = engine_logit_bound(precision, GateSet.load(bundle).max_abs_logit_diff,
                                     head if precision == "fp32" else None, x)
    return probability_bound(probabilities, logit_bound, bundle.temperature)


def test_the_two_versions_really_differ(sides):
    from model.bundle import Bundle

    small, large = (Bundle.load(sides["bundles"][v]) for v in ("1", "2"))
    assert (small.preprocess.image_size, large.preprocess.image_size) == (128, 224)
    # further apart than their float32 copies in the answers could blur
    assert abs(small.threshold - large.threshold) > U32 * (abs(small.threshold) + abs(large.threshold))


@pytest.mark.parametrize("version", ["1", "2"])
def test_every_answer_is_one_versions_whichever_transformer_sends_it(sides, uploads, version):
    alone = ask(sides["alone"][version], uploads)
    crossed = ask(sides["crossed"][version], uploads)
    probabilities, threshold, x = offline(sides["bundles"][version], uploads)
    allowed = served_against_offline(sides, version, x, probabilities)
    other, _, _ = offline(sides["bundles"]["2" if version == "1" else "1"], uploads)
    # the check can tell the versions apart: the other version's answers lie outside the bound
    assert (np.abs(other - probabilities) > allowed).sum() >= len(uploads) // 2
    for i, (a, c) in enumerate(zip(alone, crossed)):
        assert a["model_version"] == c["model_version"] == version, (i, a, c)
        assert a["threshold"] == c["threshold"] == pytest.approx(threshold, rel=U32)  # served as FP32
        # one predictor, the same batch of images: the same engine call, deterministic, so identical
        assert a["probability"] == c["probability"], f"image {i}: {a['probability']} vs {c['probability']}"
        assert abs(a["probability"] - probabilities[i]) <= allowed[i], (i, a["probability"], probabilities[i])
        assert a["label"] == c["label"] == ("PNEUMONIA" if a["probability"] >= threshold else "NORMAL")


def test_one_request_is_answered_by_one_version_over_every_protocol(sides, uploads):
    url = sides["crossed"]["2"]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(uploads)],
                        "data": [base64.b64encode(i).decode() for i in uploads]}], "parameters": {"heatmap": True}}
    reply = httpx.post(f"{url}/v2/models/pneumonia/infer", json=body, timeout=120).json()
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert reply["model_version"] == "2"
    assert outputs["cam"]["shape"] == [len(uploads), 7, 7]  # the 224 px version's CAM, whichever transformer
    assert len(set(outputs["threshold"]["data"])) == 1
    expected = [p["probability"] for p in ask(sides["alone"]["2"], uploads)]
    # one predictor, the same batch of images: the same engine call, deterministic, so identical
    assert outputs["probability"]["data"] == expected


def test_a_predictor_refuses_pixels_from_another_preprocessing(sides):
    """Stage 1 is versioned too: pixels decoded by another definition are refused, not silently scored."""
    import asyncio

    import grpc
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
    from kserve.protocol.infer_type import InferInput, InferRequest

    from model.preprocessing import PREPROCESSING_VERSION
    from serving.protocol import pack_images

    pixels, sizes = pack_images([np.full((64, 80), 120, np.uint8)])

    async def send(version):
        inputs = []
        for name, array, datatype in (("pixels", pixels, "UINT8"), ("sizes", sizes, "INT32")):
            tensor = InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        request = InferRequest("pneumonia", inputs, parameters={"preprocessing": version}).to_grpc()
        async with grpc.aio.insecure_channel(sides["predictors"]["1"]) as channel:
            try:
                reply = await GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
                return "OK", reply.model_version
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details()

    assert asyncio.run(send(PREPROCESSING_VERSION)) == ("OK", "1")
    code, details = asyncio.run(send(PREPROCESSING_VERSION - 1))
    assert code == "FAILED_PRECONDITION" and f"needs {PREPROCESSING_VERSION}" in details
