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
    code = ("import sys, serving.predictor, serving.transformer, serving.server, serving.stack, serving.client, "
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


def test_one_worker_per_process():
    """Several uvicorn workers would each keep a Prometheus registry: /metrics would show one worker's share."""
    from serving.server import check_workers

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
    from model.preprocessing import PreprocessConfig
    from serving.errors import RequestRejected
    from serving.inputs import prepare_image
    from serving.settings import ServingSettings

    config = PreprocessConfig(image_size=64, train_intensity_mean=123.0, train_intensity_std=18.5)
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
            prepare_image(data, config, settings)
        assert info.value.code == expected.removesuffix("_bright")
        assert 400 <= info.value.status < 500


def test_gate_accepts_every_real_xray():
    """Calibration check: no real X-ray of the shared data set (5,432 files) is rejected.

    Both with the intensity statistics of the whole training set and with those of a small subset
    (what a smoke-profile model carries), which underestimates their spread.
    """
    require_data()
    from model.preprocessing import PreprocessConfig, load_resized
    from serving.inputs import check_xray
    from serving.settings import ServingSettings

    settings = ServingSettings()
    base = PreprocessConfig(image_size=64)
    files = sorted(XRAY_224.glob("*/*/*")) + sorted(XRAY_FULL.glob("*/*/*"))
    assert len(files) > 5000
    decoded = [load_resized(f.read_bytes(), base) for f in files]
    means = np.array([d.pixels.mean() for d in decoded])
    subset = means[:: max(1, len(means) // 120)][:120]
    configs = [PreprocessConfig(image_size=64, train_intensity_mean=float(m.mean()), train_intensity_std=float(m.std()))
               for m in (means, subset, means[means < np.median(means)])]
    for config in configs:
        for f, image in zip(files, decoded):
            check_xray(image, config, settings, f.name)  # raises on rejection


# ---------------------------------------------------------------------------------------------------
# REST v2 binary requests

def _binary_request(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def test_parse_binary_request_keeps_raw_bytes():
    from serving.server import parse_binary_request

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
])
def test_parse_binary_request_refuses_malformed_bodies(header, blob, length):
    from serving.errors import RequestRejected
    from serving.server import parse_binary_request

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
    assert peak[0] == 2 and ("narrow", 4) in modes  # under load: two narrow runs side by side
    assert sum(n for _, n in modes) == 9


def test_dynamic_batcher_delay_and_errors():
    from serving.batching import DynamicBatcher

    calls = []

    def engine(x):
        calls.append(len(x))
        if (x < 0).any():
            raise RuntimeError("engine failure")
        return (x[:, 0],)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_delay_s=0.05)
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
