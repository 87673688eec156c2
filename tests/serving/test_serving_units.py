"""Serving: fast checks that start no server (heatmap, input gate, binary v2 parsing, batching, settings)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from serving_fixtures import XRAY_224, XRAY_FULL, require_data


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serving_modules_do_not_import_torch():
    """The serving image has no torch: importing every serving module must not pull it in."""
    code = ("import sys, serving.predictor, serving.transformer, serving.model_server, serving.stack, serving.client, "
            "serving.cli, serving.predictor_main, serving.transformer_main, serving.heatmap, serving.inputs; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'albumentations', "
            "'matplotlib')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"serving imports {result.stdout.strip()} {result.stderr[-500:]}"


def test_settings_from_environment(monkeypatch):
    from serving.settings import ServingSettings

    monkeypatch.setenv("PNEUMOSCOPE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("PNEUMOSCOPE_PREDICTOR_PROTOCOL", "v2")
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "int8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    s = ServingSettings()
    assert (s.max_batch_size, s.predictor_protocol, s.precision) == (4, "v2", "int8")
    assert s.mlflow_tracking_uri == "http://mlflow.example:5000"
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "fp16")
    with pytest.raises(ValueError):
        ServingSettings()


def test_engine_threads_and_decoders_default_to_the_cpus_the_process_may_use():
    """A pod's CPU limit or a CPU set, not the node's count: a predictor on a 64-core node with a limit of 2 CPUs
    must not start 64 engine threads. Run in a child pinned to one CPU, so the pinning stays there."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from serving.settings import ServingSettings as S; s = S(); "
            "print(s.engine_threads(), s.streams(), s.decoders(), S(threads=3).engine_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["1", "1", "1", "3"], out.stdout + out.stderr


def test_a_stacks_own_environment_wins_over_the_shared_settings(monkeypatch):
    """One side of a local canary is given its own variables (the slower-canary test's delay); the settings
    every side shares are written into the children's environment too, and must not overwrite them."""
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    monkeypatch.setenv("PNEUMOSCOPE_MAX_INFLIGHT", "7")  # the caller's environment: below both
    stack = LocalStack("unused", 0, ServingSettings(threads=1, test_delay_ms=0.0, max_inflight=16),
                       extra_env={"PNEUMOSCOPE_TEST_DELAY_MS": 400})
    env = stack._env()
    assert env["PNEUMOSCOPE_TEST_DELAY_MS"] == "400"
    assert env["PNEUMOSCOPE_MAX_INFLIGHT"] == "16" and env["PNEUMOSCOPE_THREADS"] == "1"


def test_one_worker_per_process():
    """Several uvicorn workers would each keep a Prometheus registry: /metrics would show one worker's share."""
    from serving.model_server import check_workers

    check_workers(1)
    with pytest.raises(SystemExit, match="workers must be 1"):
        check_workers(2)


# ---------------------------------------------------------------------------------------------------
# heatmap

def test_heatmap_normalise_and_upsample():
    from serving.heatmap import heatmap, normalise_cam

    cam = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    norm = normalise_cam(cam)
    assert norm.min() == 0.0 and norm.max() == 1.0 and norm[0, 0] == 0.0
    assert not normalise_cam(-np.ones((3, 3))).any()  # nothing positive: an empty map, not NaN
    up = heatmap(cam, 40, 20)
    assert up.shape == (20, 40) and 0.0 <= up.min() and up.max() <= 1.0
    assert up[-1, -1] > up[0, 0]  # the hot corner stays hot


def test_heatmap_overlay_png():
    from serving.heatmap import TURBO, render_overlay

    gray = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))
    png = render_overlay(gray, np.array([[0.0, 1.0], [0.5, 0.0]]), max_side=150)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (150, 100)
    pixels = np.asarray(image).astype(int)
    assert abs(pixels[2, 2] - pixels[2, 2].mean()).max() <= 1  # cold corner: the X-ray, gray
    assert pixels[2, 147, 0] > pixels[2, 147, 2] + 50  # hot corner: red end of the colour map
    assert TURBO.shape == (256, 3) and TURBO[0].sum() < TURBO[128].sum()  # dark -> bright -> red
    assert TURBO[64, 2] == TURBO[64].max() and TURBO[-1, 0] == TURBO[-1].max()


# ---------------------------------------------------------------------------------------------------
# input decoding and the X-ray gate

def test_element_bytes_accepts_raw_and_base64():
    from serving.errors import RequestRejected
    from serving.inputs import element_bytes

    png = _png(np.zeros((8, 8), np.uint8))
    assert element_bytes(png, "x") == png
    assert element_bytes(base64.b64encode(png), "x") == png
    assert element_bytes(base64.b64encode(png).decode(), "x") == png
    assert element_bytes("data:image/png;base64," + base64.b64encode(png).decode(), "x") == png
    with pytest.raises(RequestRejected) as info:
        element_bytes("not base64 !!", "x")
    assert info.value.code == "invalid_base64" and info.value.status == 400


def test_gate_rejects_pictures_that_are_not_xrays():
    from serving.errors import RequestRejected
    from serving.inputs import decode_upload
    from serving.settings import ServingSettings

    settings = ServingSettings()
    rng = np.random.default_rng(0)
    colour = np.zeros((128, 128, 3), np.uint8)
    colour[..., 0] = np.linspace(0, 255, 128, dtype=np.uint8)[None]
    colour[..., 1] = rng.integers(0, 256, (128, 128))
    colour[..., 2] = 180
    bands = np.repeat((np.arange(160) // 8)[:, None], 160, axis=1)
    dark = np.where(bands % 10 == 0, 120, 5).astype(np.uint8)  # mean 16, sd 35: textured but black
    bright = np.where(bands % 20 == 0, 100, 255).astype(np.uint8)  # mean 247, sd 34: washed out
    cases = {"not_grayscale": _png(colour), "low_contrast": _png(np.full((128, 128), 128, np.uint8)),
             "out_of_distribution": _png(dark), "too_small": _png(np.zeros((20, 20), np.uint8))}
    cases["out_of_distribution_bright"] = _png(bright)
    for expected, data in cases.items():
        with pytest.raises(RequestRejected) as info:
            decode_upload(data, settings)
        assert info.value.code == expected.removesuffix("_bright")
        assert 400 <= info.value.status < 500


def test_gate_accepts_every_real_xray():
    """Calibration check: no real X-ray of the shared data set (5,432 files) is rejected by the absolute bounds."""
    require_data()
    from model.preprocessing import decode
    from serving.inputs import check_xray
    from serving.settings import ServingSettings

    settings = ServingSettings()
    files = sorted(XRAY_224.glob("*/*/*")) + sorted(XRAY_FULL.glob("*/*/*"))
    assert len(files) > 5000
    means = []
    for f in files:
        image = decode(f.read_bytes(), max_pixels=settings.max_image_pixels)
        check_xray(image, settings, f.name)  # raises on rejection
        means.append(image.pixels.mean())
    # the bounds leave a margin on both sides of what real radiographs measure
    assert settings.min_mean_intensity + 20 < min(means) and max(means) < settings.max_mean_intensity - 10


@pytest.mark.parametrize("resize_mode, field_mask", [("squash", "none"), ("pad", "ellipse")])
def test_served_pixels_equal_the_training_cache(tmp_path, shared_full, resize_mode, field_mask):
    """The split path -- transformer stage 1, the v2 transport (gRPC and REST encodings), predictor stage 2 --
    gives bit-identical model inputs to what `data prepare` cached and training normalised, also for a
    version trained with `--resize pad` and `--field-mask ellipse` (both are the version's, so stage 2)."""
    import shutil
    from dataclasses import replace

    from kserve.protocol.infer_type import InferRequest

    from model.data import CachedData, SplitFractions, prepare
    from model.preprocessing import PREPROCESSING_VERSION
    from model.transforms import EvalTransform
    from serving.inputs import decode_upload
    from serving.predictor import PneumoniaPredictor
    from serving.predictor_client import PredictorClient
    from serving.dataplane import parse_binary_request
    from serving.settings import ServingSettings

    root = tmp_path / "data" / "train"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((shared_full / "train" / cls).iterdir())[20:26]:
            shutil.copy(f, root / cls / f.name)
    prepare(str(tmp_path / "data"), tmp_path / "cache", 96, SplitFractions(0.25, 0.0, 0), workers=1,
            resize_mode=resize_mode)
    cache = CachedData.load(tmp_path / "cache")
    config = replace(cache.config, field_mask=field_mask)  # as `train --field-mask` stores it in the bundle
    assert config.resize_mode == resize_mode
    settings = ServingSettings()
    predictor = PneumoniaPredictor("pneumonia", "unused", settings)
    predictor.config, predictor.model_version = config, "7"
    rows = list(cache.manifest)
    uploads = [decode_upload((tmp_path / "data" / row["file"]).read_bytes(), settings).pixels for row in rows]
    request = PredictorClient("127.0.0.1:1", "grpc-v2", "pneumonia")._request(uploads, "r1")
    over_grpc = InferRequest.from_grpc(request.to_grpc())
    rest = PredictorClient("127.0.0.1:1", "v2", "pneumonia")._request(uploads, "r2")
    body, length = rest.to_rest()
    over_rest = parse_binary_request(body, str(length), "pneumonia")
    expected = np.stack([EvalTransform(config)(cache.images[row["index"]]) for row in rows])
    for received in (over_grpc, over_rest):
        predictor._check_preprocessing(received)  # names PREPROCESSING_VERSION, as the cache does
        served = predictor.model_input(predictor._images(received))
        assert served.shape == (len(rows), 1, 96, 96) and served.dtype == np.float32
        assert np.array_equal(served, expected), "served model input differs from the training cache"
    assert cache.config.version == PREPROCESSING_VERSION


@pytest.mark.parametrize("binary", [True, False])
def test_the_rest_link_keeps_the_version_that_answered(binary):
    """Over REST v2 (transformer -> predictor), the answer still names its version: kserve's own
    ``InferResponse.from_bytes`` drops ``model_version``, and without it every answer was a 503."""
    from kserve.protocol.infer_type import InferResponse, RequestedOutput

    from serving.predictor_client import parse_rest_response
    from serving.protocol import tensor_output

    outputs = [tensor_output("probability", "FP32", np.array([0.25, 0.75], np.float32)),
               tensor_output("label", "BYTES", np.array(["NORMAL", "PNEUMONIA"], dtype=np.object_))]
    wanted = [RequestedOutput("probability", {"binary_data": binary}), RequestedOutput("label", {"binary_data": binary})]
    sent = InferResponse(response_id="r1", model_name="pneumonia", model_version="7", infer_outputs=outputs,
                         use_binary_outputs=binary, requested_outputs=wanted)
    body, length = sent.to_rest()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    got = parse_rest_response(content, None if length is None else str(length))
    assert got.model_version == "7"
    np.testing.assert_array_equal(got.outputs[0].as_numpy(), [0.25, 0.75])


# ---------------------------------------------------------------------------------------------------
# REST v2 binary requests

def _binary_request(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def test_parse_binary_request_keeps_raw_bytes():
    from serving.dataplane import parse_binary_request

    jpeg = b"\xff\xd8\xff\xe0 not UTF-8 \xff\xfe"
    tensor = struct.pack("<I", len(jpeg)) + jpeg
    body, length = _binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                "parameters": {"binary_data_size": len(tensor)}}],
                                    "parameters": {"heatmap": True}}, tensor)
    request = parse_binary_request(body, str(length), "pneumonia")
    assert request.inputs[0]._raw_data == tensor
    assert list(request.inputs[0].as_numpy()) == [jpeg]
    assert request.parameters == {"heatmap": True}


@pytest.mark.parametrize("header,blob,length", [
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]},
     b"abc", None),
    ({"inputs": "nope"}, b"", None),
    ({"inputs": [{"name": "image"}]}, b"", None),
    ({"inputs": []}, b"", "x"),
    ({"inputs": []}, b"", "100000"),
    # a shape that is not a list of integers (was a 500 with a NumPy error)
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": ["1e3", 1, 224, 224],
                  "parameters": {"binary_data_size": 0}}]}, b"", None),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [True], "parameters": {"binary_data_size": 0}}]},
     b"", None),
    # a request id that is an object (was a 500 with a pydantic error, after all the work)
    ({"id": {"nested": 1}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]},
     b"", None),
    ({"inputs": [{"name": ["x"], "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}, b"", None),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}], "parameters": [1]},
     b"", None),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}], "outputs": "all"},
     b"", None),
])
def test_parse_binary_request_refuses_malformed_bodies(header, blob, length):
    from serving.errors import RequestRejected
    from serving.dataplane import parse_binary_request

    body, json_length = _binary_request(header, blob)
    with pytest.raises(RequestRejected) as info:
        parse_binary_request(body, length or str(json_length), "pneumonia")
    assert info.value.status == 400


# ---------------------------------------------------------------------------------------------------
# dynamic batching

def test_dynamic_batcher_groups_concurrent_requests():
    from serving.batching import DynamicBatcher

    calls = []

    def engine(x):
        calls.append(len(x))
        time.sleep(0.05)
        return x.sum(axis=1), x * 2

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=0.0)
        inputs = [np.full((1 if i % 3 else 2, 3), i, np.float32) for i in range(9)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        batcher.close()
        return inputs, results

    inputs, results = asyncio.run(scenario())
    for x, (summed, doubled) in zip(inputs, results):  # every caller gets exactly its own rows back
        assert np.array_equal(summed, x.sum(axis=1)) and np.array_equal(doubled, x * 2)
    assert sum(calls) == sum(len(x) for x in inputs)
    assert max(calls) <= 4 and len(calls) < len(inputs)  # batched, never above the maximum


def test_dynamic_batcher_streams_wide_when_alone_narrow_in_parallel_under_load():
    import threading

    from serving.batching import DynamicBatcher

    active, peak, modes = [0], [0], []
    lock = threading.Lock()

    def engine(mode):
        def run(x):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                modes.append((mode, len(x)))
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            return (x[:, 0] + (100 if mode == "wide" else 0),)
        return run

    async def scenario():
        batcher = DynamicBatcher(engine("narrow"), max_batch_size=4, streams=2, run_wide=engine("wide"))
        alone = await batcher.submit(np.zeros((1, 1), np.float32))
        burst = await asyncio.gather(*(batcher.submit(np.full((1, 1), i, np.float32)) for i in range(8)))
        batcher.close()
        return alone, burst

    alone, burst = asyncio.run(scenario())
    assert modes[0] == ("wide", 1) and alone[0][0] == 100  # a lone request gets all threads
    assert [float(b[0][0]) % 100 for b in burst] == list(range(8))  # every caller gets its own row
    assert peak[0] == 2  # under load: two narrow runs side by side,
    assert {n for mode, n in modes if mode == "narrow"} == {1}  # one request each (a batch gains nothing there)
    assert sum(n for _, n in modes) == 9


def test_occupancy_is_a_time_weighted_mean_that_decays():
    from serving.batching import Occupancy

    now = [0.0]
    occupancy = Occupancy(0.5, clock=lambda: now[0])
    occupancy.add(3)
    now[0] += 2.0  # four time constants with three requests in
    assert 2.9 < occupancy.recent() <= 3.0
    occupancy.add(-3)
    now[0] += 2.0
    assert occupancy.recent() < 0.1


def test_dynamic_batcher_runs_narrow_while_a_closed_loop_keeps_it_busy_and_wide_again_once_quiet():
    """Behind a transformer the engine is often idle at the instant a request arrives although two clients keep
    it busy: those requests run narrow, side by side, not one after another on all threads."""
    from serving.batching import WIDE_BELOW_OCCUPANCY, DynamicBatcher, Occupancy

    modes = []

    def engine(mode, seconds):
        def run(x):
            modes.append(mode)
            time.sleep(seconds)
            return (x[:, 0],)
        return run

    async def client(batcher, rounds):
        for _ in range(rounds):
            await batcher.submit(np.zeros((1, 1), np.float32))
            await asyncio.sleep(0.008)  # the next film being decoded

    async def scenario():
        batcher = DynamicBatcher(engine("narrow", 0.02), max_batch_size=4, streams=2,
                                 run_wide=engine("wide", 0.01))
        batcher.occupancy = Occupancy(0.1)
        await asyncio.gather(client(batcher, 25), client(batcher, 25))
        busy = list(modes)
        await asyncio.sleep(0.6)  # six time constants of quiet
        assert batcher.occupancy.recent() < WIDE_BELOW_OCCUPANCY
        await batcher.submit(np.zeros((1, 1), np.float32))
        batcher.close()
        return busy, modes[-1]

    busy, lone = asyncio.run(scenario())
    assert busy[-30:].count("narrow") >= 27, busy
    assert lone == "wide"


def test_dynamic_batcher_delay_and_errors():
    from serving.batching import DynamicBatcher

    calls = []

    def engine(x):
        calls.append(len(x))
        if (x < 0).any():
            raise RuntimeError("engine failure")
        return (x[:, 0],)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_delay_s=0.3)  # room for a slow loop
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0.01)  # arrives within the delay: shares the first engine call
        second = await batcher.submit(np.ones((2, 1), np.float32))
        (first_rows,), (second_rows,) = await first, second  # one output tensor each
        assert len(first_rows) == 1 and len(second_rows) == 2  # each caller gets its own rows
        with pytest.raises(RuntimeError):
            await batcher.submit(-np.ones((1, 1), np.float32))
        ok = await batcher.submit(np.ones((1, 1), np.float32))  # the batcher survives a failed batch
        batcher.close()
        return ok

    assert len(asyncio.run(scenario())[0]) == 1
    assert calls[0] == 3


def test_a_batch_that_cannot_be_formed_fails_its_requests_and_the_stream_lives_on():
    """Each stream is a thread: an error before the engine runs (rows that do not stack) must fail those requests
    with the reason, not end the thread and leave every later request hanging."""
    from serving.batching import DynamicBatcher

    def engine(x):
        time.sleep(0.02 if x[0, 0] != 9 else 0.5)
        return (x[:, 0],)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=8)  # one stream: it takes whatever waits, as one batch
        busy = asyncio.ensure_future(batcher.submit(np.full((1, 2), 9, np.float32)))
        await asyncio.sleep(0.05)  # the stream is busy for half a second: the next two queue and go together
        mismatched = await asyncio.wait_for(asyncio.gather(
            batcher.submit(np.ones((1, 3), np.float32)), batcher.submit(np.ones((1, 4), np.float32)),
            return_exceptions=True), timeout=5)
        later = await asyncio.wait_for(batcher.submit(np.full((1, 2), 7, np.float32)), timeout=5)
        batcher.close()
        return await busy, mismatched, later

    busy, mismatched, later = asyncio.run(scenario())
    assert busy[0][0] == 9
    assert all(isinstance(r, ValueError) for r in mismatched), mismatched
    assert later[0][0] == 7


def test_dynamic_batcher_drops_late_and_abandoned_requests_and_fails_the_rest_on_close():
    from serving.batching import DynamicBatcher
    from serving.errors import DeadlineExceeded, ShuttingDown

    seen = []

    def engine(x):
        seen.extend(x[:, 0].tolist())
        time.sleep(0.2)
        return (x[:, 0],)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=1)
        busy = asyncio.ensure_future(batcher.submit(np.full((1, 1), 1, np.float32)))
        await asyncio.sleep(0.05)  # the engine is busy with request 1; the next ones queue
        late = asyncio.ensure_future(batcher.submit(np.full((1, 1), 2, np.float32), deadline=time.monotonic() + 0.01))
        gone = asyncio.ensure_future(batcher.submit(np.full((1, 1), 3, np.float32)))
        kept = asyncio.ensure_future(batcher.submit(np.full((1, 1), 4, np.float32)))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away
        assert (await busy)[0][0] == 1 and (await kept)[0][0] == 4
        with pytest.raises(DeadlineExceeded):
            await late
        waiting = asyncio.ensure_future(batcher.submit(np.full((1, 1), 5, np.float32)))
        queued = asyncio.ensure_future(batcher.submit(np.full((1, 1), 6, np.float32)))
        await asyncio.sleep(0.05)
        batcher.close()  # shutdown: nothing queued may hang
        results = await asyncio.gather(waiting, queued, return_exceptions=True)
        return results

    results = asyncio.run(scenario())
    assert 2 not in seen and 3 not in seen, f"late or abandoned requests reached the engine: {seen}"
    assert any(isinstance(r, ShuttingDown) for r in results)
    assert all(isinstance(r, (ShuttingDown, tuple)) for r in results)


def test_admission_bounds_requests_in_flight_and_drains():
    from serving.admission import Admission
    from serving.errors import Overloaded, ShuttingDown

    async def scenario():
        admission = Admission(2)
        admission.enter()
        admission.enter()
        with pytest.raises(Overloaded) as info:
            admission.enter()
        assert info.value.status == 503 and info.value.retry_after and info.value.grpc_code == "RESOURCE_EXHAUSTED"
        admission.leave()
        admission.enter()  # a slot came free

        async def slow():
            await asyncio.sleep(30)

        stuck = asyncio.ensure_future(slow())
        admission.track(stuck)
        asyncio.get_running_loop().call_later(0.05, admission.leave)
        cut = await admission.drain(0.2)
        with pytest.raises(ShuttingDown):
            admission.enter()
        return cut, stuck

    cut, stuck = asyncio.run(scenario())
    assert cut == 1 and stuck.cancelled()


def test_transformer_checks_the_declared_count_before_it_walks_a_bytes_tensor():
    """A BYTES [N] input is refused for its declared N before one element is read (413), and a malformed
    tensor within the limit is a 400 naming the input, not a 500."""
    from kserve.protocol.infer_type import InferInput, InferRequest

    from serving.errors import RequestRejected
    from serving.settings import ServingSettings
    from serving.transformer import PneumoniaTransformer

    transformer = PneumoniaTransformer("pneumonia", "127.0.0.1:1", settings=ServingSettings(max_images_per_request=4))

    def request(count: int, raw: bytes) -> InferRequest:
        tensor = InferInput("image", [count], "BYTES")
        tensor._raw_data = raw  # as serving.dataplane.parse_binary_request leaves it
        return InferRequest(model_name="pneumonia", infer_inputs=[tensor])

    def tensor(*items):
        return b"".join(len(i).to_bytes(4, "little") + i for i in items)

    assert transformer._v2_elements(request(2, tensor(b"\xff\xd8\xffa", b"\x89PNG\r\n\x1a\nb")))[0] == [
        b"\xff\xd8\xffa", b"\x89PNG\r\n\x1a\nb"]
    with pytest.raises(RequestRejected) as info:
        transformer._v2_elements(request(10**6, b"\xff" * 7))  # garbage that a walk would choke on
    assert (info.value.status, info.value.reason) == (413, "too_many_images")
    for raw, count in ((tensor(b"a", b"b"), 1), (tensor(b"a"), 2), (tensor(b"abc")[:-1], 1), (b"\x01\x00", 1)):
        with pytest.raises(RequestRejected) as info:
            transformer._v2_elements(request(count, raw))
        assert (info.value.status, info.value.reason) == (400, "invalid_tensor") and "'image'" in str(info.value)


def test_transport_packs_images_of_different_sizes():
    from serving.protocol import pack_images, unpack_images

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((40, 70), (512, 300), (1, 1))]
    pixels, sizes = pack_images(images)
    assert pixels.shape == (3, 512, 300) and sizes.tolist() == [[40, 70], [512, 300], [1, 1]]
    assert all(np.array_equal(a, b) for a, b in zip(images, unpack_images(pixels, sizes)))


# ---------------------------------------------------------------------------------------------------
# the REST guard, in-process (a stub ASGI app stands in for kserve's routes)

def _asgi_call(guard, path="/v2/models/pneumonia/infer", body=b"{}", headers=(), disconnect_after_body=False,
               on_send=None):
    """Drive the guard like uvicorn does; returns (status, headers, body)."""
    sent = []

    async def run():
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()

        async def receive():
            if messages:
                return messages.pop(0)
            if disconnect_after_body:
                await asyncio.sleep(0.05)
                gone.set()
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)
            if on_send is not None:
                on_send(message)

        scope = {"type": "http", "method": "POST", "path": path,
                 "headers": [(k.encode(), v.encode("utf-8")) for k, v in headers]}
        await asyncio.wait_for(guard(scope, receive, send), 10)

    asyncio.run(run())
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"] if start else None), dict(start["headers"]) if start else {}, payload


def test_load_refusals_are_logged_once_per_interval_with_their_count(caplog, monkeypatch):
    from serving import refusals

    clock = FakeClock()
    monkeypatch.setattr(refusals.time, "monotonic", clock)
    monkeypatch.setattr(refusals, "_summaries", {})
    with caplog.at_level("INFO", logger="pneumoscope.serving"):
        for _ in range(500):  # an overload: 500 refusals in 5 s
            refusals.log_refusal(503, "overloaded", "at its limit", "request x")
            clock.now += 0.01
        refusals.log_refusal(400, "invalid_request", "bad", "request y")  # other refusals: every one
        clock.now += 6.0
        refusals.log_refusal(503, "overloaded", "at its limit", "request z")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "invalid_request" in lines[1]
    assert "499 more refused in the last 11 s" in lines[2]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admission_follows_the_measured_service_rate_and_the_latency_budget():
    from serving.admission import Admission
    from serving.errors import Overloaded

    clock = FakeClock()
    admission = Admission(64, min_inflight=2, latency_budget_s=0.1, clock=clock)
    assert admission.limit == 64  # nothing measured, a budget the operator set: the hard bound
    admission.enter()
    admission.enter()
    # a server that completes 50 requests per busy second, 2 in flight: every 20 ms one leaves, one comes
    for _ in range(40):
        clock.now += 0.02
        admission.leave()
        admission.enter()
    assert admission.estimate.rate() == pytest.approx(50.0)
    assert admission.limit == 5  # 50/s x 100 ms
    admission.enter()
    admission.enter()
    admission.enter()
    with pytest.raises(Overloaded) as refused:  # the sixth would wait 120 ms
        admission.enter()
    assert "latency budget of 100 ms" in refused.value.message and refused.value.retry_after == 1
    # idle time is not service time: a pause does not lower the measured rate
    for _ in range(5):  # the queue drains at the same pace
        clock.now += 0.02
        admission.leave()
    clock.now += 30.0
    assert admission.inflight == 0 and admission.estimate.rate() == pytest.approx(50.0)
    # deadline-aware: with 2 in flight a request expects (2 + 1) / 50 = 60 ms; a 50 ms deadline is refused now
    admission.enter()
    admission.enter()
    with pytest.raises(Overloaded) as late:
        admission.enter(deadline_s=0.05)
    assert "after this request's deadline of 50 ms" in late.value.message
    admission.enter(deadline_s=0.07)  # one that can wait is admitted
    assert admission.inflight == 3


def test_a_fresh_process_takes_its_unloaded_latency_as_a_prior_for_the_rate():
    from serving.admission import Admission

    clock = FakeClock()
    admission = Admission(64, min_inflight=2, latency_budget_s=1.0, clock=clock)
    assert admission.limit == 64  # nothing known yet
    admission.enter()
    clock.now += 0.05
    admission.leave()  # one request alone, 50 ms: 2 side by side per 50 ms until the rate is measured
    assert admission.estimate.rate() is None and admission.limit == 40
    assert admission.expected_wait() == pytest.approx(1 / 40)


def test_admission_budget_follows_the_unloaded_latency_and_bounds_memory():
    from serving.admission import Admission

    clock = FakeClock()
    admission = Admission(6, min_inflight=2, auto_budget=True, clock=clock)
    assert admission.budget() is None and admission.limit == 2
    for _ in range(10):  # alone, 40 ms each: the unloaded latency
        admission.enter()
        clock.now += 0.04
        admission.leave()
        clock.now += 0.5
    assert admission.budget() == pytest.approx(0.08)  # twice the unloaded latency
    assert admission.estimate.rate() == pytest.approx(25.0)  # 1 / 40 ms, idle gaps excluded
    assert admission.limit == 2  # 25/s x 80 ms
    # a queue served faster when deeper (batching): 200 per busy second with 4 in flight
    for _ in range(4):
        admission.enter() if admission.inflight < 2 else None
    admission.latency_budget_s = 1.0
    for _ in range(40):
        clock.now += 0.005
        admission.leave()
        admission.enter()
    assert admission.estimate.rate() == pytest.approx(200.0)
    assert admission.limit == 6  # 200 x 1 s, bounded by max_inflight


def test_unloaded_latency_comes_only_from_requests_served_alone():
    from serving.admission import Admission

    clock = FakeClock()
    admission = Admission(16, min_inflight=2, auto_budget=True, clock=clock)
    for _ in range(5):  # alone: 20 ms each
        admission.enter()
        clock.now += 0.02
        admission.leave()
        clock.now += 0.1
    assert admission.budget() == pytest.approx(0.04)
    for _ in range(20):  # each found the process idle, but another came in behind it and slowed it to 90 ms
        first = object()
        admission.enter(first)
        clock.now += 0.01
        admission.enter()
        clock.now += 0.08
        admission.leave(first)
        clock.now += 0.01
        admission.leave()
        clock.now += 0.1
    assert admission.budget() == pytest.approx(0.04)  # still twice the unloaded 20 ms


def test_admission_keeps_the_p99_not_the_mean_within_the_budget():
    from serving.admission import MIN_SPREAD_SAMPLES, Admission

    clock = FakeClock()
    admission = Admission(64, min_inflight=1, latency_budget_s=0.1, clock=clock)
    admission.enter()
    for _ in range(40):  # 50 per busy second, all alike: the limit is rate x budget
        clock.now += 0.02
        admission.leave()
        admission.enter()
    assert admission.estimate.spread() == 1.0 and admission.limit == 5
    for k in range(2 * MIN_SPREAD_SAMPLES):  # same rate, but one latency in ten three times the others
        slow = k % 10 == 0
        clock.now += 0.02
        admission.leave()
        admission.enter()
        admission.estimate._latencies[-1] = 0.06 if slow else 0.02
        admission.estimate._spread = None
    spread = admission.estimate.spread()
    assert 2.0 < spread < 3.0  # p99 60 ms over a mean of 24 ms
    assert admission.limit == int(50 * 0.1 / spread)  # so that the slow tail, not the mean, meets 100 ms


def test_guard_answers_unexpected_errors_with_a_generic_500_logged_once(caplog):
    from serving.admission import Admission
    from serving.rest_server import RequestGuard

    async def broken(scope, receive, send):
        await receive()
        raise RuntimeError("secret internals at 0x7f00deadbeef")

    guard = RequestGuard(broken, 1000, Admission(4), 5.0)
    with caplog.at_level("INFO"):
        status, _, body = _asgi_call(guard, headers=[("x-request-id", "abc-123")])
    reply = json.loads(body)
    assert status == 500 and reply == {"error": "internal error", "reason": "internal", "request_id": "abc-123"}
    records = [r for r in caplog.records if "abc-123" in r.getMessage()]
    assert len(records) == 1 and records[0].levelname == "ERROR" and records[0].exc_info


def test_guard_refuses_overload_bad_headers_big_bodies_and_control_paths(caplog):
    from serving.admission import Admission
    from serving.rest_server import RequestGuard

    async def ok(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    admission = Admission(1)
    guard = RequestGuard(ok, 100, admission, 5.0)
    assert _asgi_call(guard)[0] == 200
    admission.enter()  # the only slot is taken
    status, headers, body = _asgi_call(guard)
    assert status == 503 and headers[b"retry-after"] == b"1" and json.loads(body)["reason"] == "overloaded"
    admission.leave()
    cases = {"invalid_header": dict(headers=[("x-request-id", "h\u00e9llo")]),
             "too_large": dict(body=b"x" * 101), "empty": dict(body=b""),
             "control_plane": dict(path="/v2/repository/models/pneumonia/unload")}
    cases["invalid_header_timeout"] = dict(headers=[("x-request-timeout-ms", "soon")])
    with caplog.at_level("INFO"):
        for reason, kwargs in cases.items():
            status, _, body = _asgi_call(guard, **kwargs)
            assert 400 <= status < 500 and json.loads(body)["reason"] == reason.removesuffix("_timeout"), (reason, body)
    assert not [r for r in caplog.records if r.exc_info], "a refusal was logged with a traceback"
    assert admission.inflight == 0


def test_guard_cancels_the_work_of_a_client_that_disconnects():
    from serving.admission import Admission
    from serving.metrics import CANCELLED
    from serving.rest_server import RequestGuard

    state = {}

    async def slow(scope, receive, send):
        await receive()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    admission = Admission(2)
    before = CANCELLED._value.get()
    status, _, _ = _asgi_call(RequestGuard(slow, 1000, admission, 60.0), disconnect_after_body=True)
    assert status is None and state.get("cancelled") and CANCELLED._value.get() == before + 1
    assert admission.inflight == 0


def test_guard_frees_the_slot_before_the_answer_goes_out():
    """A client that sends its next request the moment it has its answer must find its slot free (the soak
    saw 22 % 503s with as many clients as the limit when the slot was freed only after the reply)."""
    from serving.admission import Admission
    from serving.rest_server import RequestGuard

    async def ok(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    admission = Admission(1)
    in_flight_as_answer_leaves = []

    def watch(message):
        if message["type"] == "http.response.body":
            in_flight_as_answer_leaves.append(admission.inflight)

    assert _asgi_call(RequestGuard(ok, 100, admission, 5.0), on_send=watch)[0] == 200
    assert in_flight_as_answer_leaves == [0] and admission.inflight == 0


def test_ages_sent_as_json_numbers_are_read_and_malformed_ones_refused():
    """``ages`` in a JSON v2 body arrives as a list of numbers, not raw bytes: read as years, negative = unknown;
    a bool, a string, a non-finite value or the wrong count is a 400 with one line, never a 500."""
    from kserve.protocol.infer_type import InferInput, InferRequest

    from serving.errors import RequestRejected
    from serving.predictor_inputs import read_ages

    def request(data, datatype="FP32", shape=None):
        ages = InferInput("ages", [len(data)] if shape is None else shape, datatype, data)
        return InferRequest("pneumonia", infer_inputs=[ages])

    ages = read_ages(request([4, 45.5, -1]), 3)
    assert ages[:2].tolist() == [4.0, 45.5] and np.isnan(ages[2])
    assert np.isnan(read_ages(InferRequest("pneumonia", infer_inputs=[]), 2)).all()
    for bad, why in (([True, 3], "numbers"), (["45", 3], "numbers"), ([4], "[N]"), ([1, 2], "FP64"),
                     ([float("inf"), 2], "finite")):
        with pytest.raises(RequestRejected) as refused:
            read_ages(request(bad, "FP64" if why == "FP64" else "FP32"), 2)
        assert refused.value.reason == "invalid_tensor" and why in str(refused.value), (bad, str(refused.value))
