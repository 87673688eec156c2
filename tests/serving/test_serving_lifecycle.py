"""Serving under pressure, on real processes: admission by latency budget and deadline, within a hard bound
(503 + Retry-After / RESOURCE_EXHAUSTED at once, before the body is read), deadlines, draining on SIGTERM
(readiness first, then intake, then in-flight work), and a stack stopped
under load: zero hung requests, zero 500s, exit 0, the transformer before the predictor. A predictor's own download
folder goes once the model is loaded.

Requests are held in flight deterministically: a client that has sent its headers and half its body is
admitted and stays so until it sends the rest (no timing assumptions about how fast the server is).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.load import HeldRequest
from serving_fixtures import XRAY_FULL, free_port_pair, require_data, shared_bundle, xray_files

pytestmark = pytest.mark.integration

MAX_INFLIGHT = 2  # the hard bound of the `limited` stack
MIN_SAMPLES = 10  # requests that measure the service rate (serving.admission.MIN_RATE_SAMPLES and more)
DRAIN_S = 8.0  # long enough for the checks made during the drain on a loaded 2-core machine


@pytest.fixture(scope="module")
def bundle():
    require_data()
    from model.bundle import Bundle

    import kserve.protocol.grpc.grpc_predict_v2_pb2_grpc  # noqa: F401  (slow first import, not inside a drain)

    path, _ = shared_bundle()
    return path, Bundle.load(path).sha256


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    require_data()
    return [f.read_bytes() for f in xray_files(per_class=2, root=XRAY_FULL)]


def start_stack(bundle, tmp_path, **overrides):
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    path, digest = bundle
    settings = ServingSettings(**{"threads": 2, "max_inflight": MAX_INFLIGHT, "drain_timeout_s": DRAIN_S,
                                  "model_sha256": digest, **overrides})
    stack = LocalStack(str(path), free_port_pair(), settings, log_file=tmp_path / "stack.log", restart=False)
    stack.start(timeout=300)
    return stack


def v1_body(data: bytes) -> bytes:
    return json.dumps({"instances": [{"image": {"b64": base64.b64encode(data).decode()}}]}).encode()


def metric(url: str, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if line[len(name)] in "{ ":
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def grpc_infer(target: str, data: bytes, timeout: float = 30.0) -> tuple[str, str]:
    import asyncio

    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb  # imported by the fixture: no delay here
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    request = pb.ModelInferRequest(model_name="pneumonia", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[data]))])

    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                await GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
                return "OK", ""
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details()

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(bundle, tmp_path_factory):
    """One stack for the admission and deadline tests (the drain tests stop theirs)."""
    stack = start_stack(bundle, tmp_path_factory.mktemp("limited"))
    yield stack
    stack.stop()


def test_admission_refuses_at_once_beyond_the_limit_and_recovers(limited, images):
    stack = limited
    rest, grpc_target = stack.info["rest"], stack.info["grpc"]
    held = [HeldRequest(rest, "/v1/models/pneumonia:predict", v1_body(images[0])) for _ in range(MAX_INFLIGHT)]
    wait_for(lambda: metric(rest, "pneumoscope_inflight_requests") == MAX_INFLIGHT, what="2 requests in flight")
    started = time.perf_counter()
    refused = httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]), timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json()["reason"] == "overloaded" and time.perf_counter() - started < 5
    assert grpc_infer(grpc_target, images[1])[0] == "RESOURCE_EXHAUSTED"
    assert httpx.get(f"{rest}/v2/health/ready", timeout=30).status_code == 200  # busy is not unready
    assert [h.finish()[0] for h in held] == [200] * MAX_INFLIGHT  # the admitted ones finish normally
    assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]),
                      timeout=60).status_code == 200
    assert metric(rest, "pneumoscope_input_rejections_total", reason="overloaded") == 2

    # the predictor has its own bound: when it is full, the transformer says so with a 503, at once
    predictor = stack.info["predictor_rest"]
    pixels = HeldRequest(predictor, "/v2/models/pneumonia/infer", b"{" + b" " * 4000 + b"}")
    more = HeldRequest(predictor, "/v2/models/pneumonia/infer", b"{" + b" " * 4000 + b"}")
    wait_for(lambda: metric(predictor, "pneumoscope_inflight_requests") == MAX_INFLIGHT, what="predictor full")
    busy = httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]), timeout=30)
    assert busy.status_code == 503 and busy.json()["reason"] == "predictor_unavailable", busy.text
    assert "127.0.0.1" not in busy.text
    pixels.close()
    more.close()  # clients that go away free their slots
    wait_for(lambda: metric(predictor, "pneumoscope_inflight_requests") == 0, what="slots freed")
    assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]),
                      timeout=60).status_code == 200


def test_the_queue_is_as_deep_as_the_budget_allows_and_refuses_what_would_miss_its_deadline(bundle, images,
                                                                                             tmp_path):
    """A generous budget: more requests in flight than CPUs are queued (the old fixed limit refused them), a
    request whose own deadline cannot be met is refused at once (not accepted and timed out), the queue drains."""
    from model.settings import available_cpus

    stack = start_stack(bundle, tmp_path, max_inflight=None, latency_budget_ms=60_000)
    rest = stack.info["rest"]
    try:
        for _ in range(MIN_SAMPLES):  # the service rate is measured on real requests
            assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[0]),
                              timeout=60).status_code == 200
        depth = max(2, available_cpus()) + 1  # beyond the floor of always-admitted requests
        held = [HeldRequest(rest, "/v1/models/pneumonia:predict", v1_body(images[0])) for _ in range(depth)]
        wait_for(lambda: metric(rest, "pneumoscope_inflight_requests") == depth, what=f"{depth} requests in flight")
        started = time.perf_counter()
        late = httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]), timeout=30,
                          headers={"x-request-timeout-ms": "1"})
        assert late.status_code == 503 and late.headers["retry-after"] == "1", late.text
        assert late.json()["reason"] == "overloaded" and "deadline of 1 ms" in late.json()["error"]
        assert time.perf_counter() - started < 5
        assert [h.finish()[0] for h in held] == [200] * depth  # the queue drains, every admitted request answered
        wait_for(lambda: metric(rest, "pneumoscope_inflight_requests") == 0, what="the queue drained")
        assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]),
                          timeout=60).status_code == 200
        assert metric(rest, "pneumoscope_service_rate") > 0
        assert metric(rest, "pneumoscope_admission_limit") > depth
    finally:
        stack.stop()


def test_a_request_beyond_the_latency_budget_is_refused_at_once_and_the_queue_drains(bundle, images, tmp_path):
    """A budget no request can meet: the limit falls to the floor; one more is refused at once over REST (before
    its body is read) and gRPC (before its message is parsed), with Retry-After; the admitted ones finish."""
    stack = start_stack(bundle, tmp_path, max_inflight=None, latency_budget_ms=1)
    rest, grpc_target = stack.info["rest"], stack.info["grpc"]
    try:
        for _ in range(MIN_SAMPLES):
            assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[0]),
                              timeout=60).status_code == 200
        limit = int(metric(rest, "pneumoscope_admission_limit"))
        assert limit >= 2 and metric(rest, "pneumoscope_latency_budget_seconds") == 0.001
        held = [HeldRequest(rest, "/v1/models/pneumonia:predict", v1_body(images[0])) for _ in range(limit)]
        wait_for(lambda: metric(rest, "pneumoscope_inflight_requests") == limit, what=f"{limit} in flight")
        started = time.perf_counter()
        # half of a 2 MB body sent: refused from its headers, the rest never read
        refused = HeldRequest(rest, "/v1/models/pneumonia:predict", b"x" * 2_000_000)
        status, body = refused.response()
        assert status == 503 and body["reason"] == "overloaded" and "latency budget of 1 ms" in body["error"], body
        assert time.perf_counter() - started < 5
        code, details = grpc_infer(grpc_target, images[1])
        assert code == "RESOURCE_EXHAUSTED" and "latency budget" in details
        assert metric(rest, "pneumoscope_requests_total", protocol="grpc", code="429") == 1
        assert [h.finish()[0] for h in held] == [200] * limit
        wait_for(lambda: metric(rest, "pneumoscope_inflight_requests") == 0, what="the queue drained")
        assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[1]),
                          timeout=60).status_code == 200
    finally:
        stack.stop()


def test_deadlines_come_from_the_client(limited, images):
    stack = limited
    rest = stack.info["rest"]
    late = httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[0]), timeout=30,
                      headers={"x-request-timeout-ms": "1"})  # spent while the image decodes
    assert late.status_code == 504 and late.json()["reason"] == "deadline_exceeded", late.text
    ok = httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[0]), timeout=60,
                    headers={"x-request-timeout-ms": "60000"})
    assert ok.status_code == 200
    code, _ = grpc_infer(stack.info["grpc"], images[0], timeout=0.001)
    assert code == "DEADLINE_EXCEEDED"
    assert httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[0]),
                      timeout=60).status_code == 200


def test_sigterm_drains_readiness_first_then_intake_then_in_flight_work(bundle, images, tmp_path):
    stack = start_stack(bundle, tmp_path)
    rest, grpc_target = stack.info["rest"], stack.info["grpc"]
    transformer = stack.children["transformer"].process
    try:
        finishing = HeldRequest(rest, "/v1/models/pneumonia:predict", v1_body(images[0]))
        stuck = HeldRequest(rest, "/v1/models/pneumonia:predict", v1_body(images[1]))
        wait_for(lambda: metric(rest, "pneumoscope_inflight_requests") == 2, what="2 requests in flight")
        signalled = time.monotonic()
        transformer.terminate()
        wait_for(lambda: httpx.get(f"{rest}/v2/health/ready", timeout=30).status_code == 503, what="readiness false")
        assert httpx.get(f"{rest}/v2/models/pneumonia/ready", timeout=30).status_code == 503
        refused = httpx.post(f"{rest}/v1/models/pneumonia:predict", content=v1_body(images[0]), timeout=30)
        assert refused.status_code == 503 and refused.json()["reason"] == "shutting_down", refused.text
        assert refused.headers["retry-after"] == "1"
        assert grpc_infer(grpc_target, images[0])[0] == "UNAVAILABLE"
        status, body = finishing.finish()  # in-flight work completes during the drain
        assert status == 200 and body["predictions"][0]["model_version"] == "local"
        status, body = stuck.response()  # never completed: cut off with a clean 503 when the drain time is up
        assert status == 503 and body["reason"] == "shutting_down"
        assert transformer.wait(30) == 0
        assert DRAIN_S - 0.5 <= time.monotonic() - signalled < DRAIN_S + 15
    finally:
        stack.stop()


def test_stopping_the_stack_under_load_hangs_nothing_and_answers_no_500(bundle, images, tmp_path):
    """SIGTERM-under-load: clients keep sending while the stack stops (transformer first, then predictor)."""
    stack = start_stack(bundle, tmp_path, max_inflight=64)
    rest = stack.info["rest"]
    outcomes: list[str] = []
    lock = threading.Lock()
    stop_sending = threading.Event()

    def client(i: int) -> None:
        body = v1_body(images[i % len(images)])
        with httpx.Client(timeout=60) as http:
            while not stop_sending.is_set():
                try:
                    status = http.post(f"{rest}/v1/models/pneumonia:predict", content=body).status_code
                    outcome = str(status)
                except httpx.TimeoutException:
                    outcome = "hung"
                except httpx.TransportError:
                    outcome = "refused"  # the listener is closed: the client fails over, nothing hangs
                with lock:
                    outcomes.append(outcome)
                if outcome == "refused":
                    return
                if outcome == "503":
                    time.sleep(0.05)  # Retry-After, shortened

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        wait_for(lambda: outcomes.count("200") >= 6, timeout=120, what="traffic")
        stack.stop()
        stop_sending.set()
        for future in futures:
            future.result(timeout=120)
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert counts.get("hung", 0) == 0, counts
    assert not [k for k in counts if k.isdigit() and int(k) >= 500 and k != "503"], counts
    assert set(counts) <= {"200", "503", "refused"}, counts
    assert list(stack.exit_codes.items()) == [("transformer", 0), ("predictor", 0)]
    log = (tmp_path / "stack.log").read_text()
    pids = stack.info["pids"]
    drained = [line for line in log.splitlines() if "shutting down (signal" in line]
    assert [int(line.split()[2]) for line in drained] == [pids["transformer"], pids["predictor"]], drained


def test_a_registry_download_leaves_no_folder_behind_and_a_model_cache_keeps_it(bundle, tmp_path, monkeypatch):
    """Without a model cache the predictor downloads the version into a temporary folder of its own and removes it
    once everything is read into memory (a restarted container would otherwise keep one copy per start in its
    /tmp); it serves on from memory, and removes the folders of predictors that died while loading. With a cache
    folder, the download stays there."""
    import tempfile

    import numpy as np

    from serving.predictor import PneumoniaPredictor
    from serving.settings import ServingSettings
    from serving_fixtures import register

    path, digest = bundle
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register(path, uri)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # folders left by predictors killed while loading: one whose process is gone, one named for this process (a
    # restarted container's PID 1); a living predictor's download and someone else's folder stay
    gone = subprocess.Popen(["true"])
    gone.wait()
    living = subprocess.Popen(["sleep", "60"])
    stale = [f"pneumoscope-predictor-{gone.pid}-a1", f"pneumoscope-predictor-{os.getpid()}-b2"]
    kept = [f"pneumoscope-predictor-{living.pid}-c3", "pneumoscope-predictor-notapid", "other-folder"]
    for name in stale + kept:
        (temp / name / "model").mkdir(parents=True)
    for cache in (None, tmp_path / "cache"):
        settings = ServingSettings(threads=2, max_batch_size=2, engine="onnxruntime", mlflow_tracking_uri=uri,
                                   model_cache=str(cache) if cache else None)
        predictor = PneumoniaPredictor("pneumonia", f"models:/pneumonia/{version}", settings)
        assert predictor.load() and predictor.model_digest == digest
        try:
            assert sorted(p.name for p in temp.iterdir()) == sorted(kept)
            size = predictor.image_size
            logits, _, _ = predictor.run_engine(np.zeros((1, 1, size, size), dtype=np.float32))
            assert np.isfinite(logits).all()
        finally:
            predictor.stop()
    living.kill()
    living.wait()
    assert {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()} >= {"pneumoscope.json", "model.onnx"}
