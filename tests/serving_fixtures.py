"""Fixtures for the serving tests: a small real-weights-free bundle, real X-rays, server processes.

The bundle is a randomly initialised ResNet-50 exported exactly like a trained one (ONNX with logit +
CAM, static int8, ``pneumoscope.json`` with hashes); serving behaviour does not depend on the weights.
Its temperature and threshold are set so that the test X-rays get both labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from conftest import SHARED_DATA, require_shared

XRAY_224 = SHARED_DATA / "chest_xray_224"
XRAY_FULL = SHARED_DATA / "chest_xray_full"
TEST_IMAGE_SIZE = 128  # a 4x4 CAM: enough structure to compare heatmaps, cheap on 2 cores


def require_data() -> Path:
    require_shared("chest_xray_224/train/NORMAL")
    return SHARED_DATA


def xray_files(per_class: int = 4, root: Path = XRAY_224, split: str = "train", offset: int = 0) -> list[Path]:
    files = []
    for cls in ("NORMAL", "PNEUMONIA"):
        names = sorted((root / split / cls).iterdir())
        files += names[offset:offset + per_class]
    return files


def free_port_pair(start: int = 18000, stop: int = 19990) -> int:
    """A port P with P and P+1 free on loopback, from the unusual range 18000-19999."""
    from serving.stack import port_free

    rng = np.random.default_rng(os.getpid())
    for _ in range(200):
        port = int(rng.integers(start, stop))
        if all(port_free(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no free port pair in 18000-19999")


_BUILT: dict = {}


#: A folder where shared_bundle keeps its bundles for other pytest processes of one run (the kernel-path
#: re-runs of test_numerics_kernel_paths.py set it): each is exported once, not once per process.
BUNDLE_CACHE_ENV = "PNEUMOSCOPE_TEST_BUNDLE_CACHE"


def shared_bundle(image_size: int = TEST_IMAGE_SIZE, seed: int = 0, int8: bool = True):
    """build_bundle once per test session and arguments (exporting a ResNet-50 costs about a minute here)."""
    import atexit
    import shutil
    import tempfile

    key = (image_size, seed, int8)
    if key not in _BUILT:
        cache = os.environ.get(BUNDLE_CACHE_ENV)
        if cache:
            _BUILT[key] = _cached_bundle(Path(cache) / f"bundle-{image_size}-{seed}-{int(int8)}", *key)
        else:
            root = Path(tempfile.mkdtemp(prefix="pneumoscope-test-bundle-"))
            atexit.register(shutil.rmtree, root, True)
            _BUILT[key] = build_bundle(root / "bundle", image_size=image_size, seed=seed, int8=int8)
    return _BUILT[key]


def _cached_bundle(entry: Path, image_size: int, seed: int, int8: bool):
    """The bundle and its network from ``entry``, built there first if no earlier process finished it."""
    import shutil

    import torch

    from model.network import build_resnet50

    if not (entry / "complete").exists():
        shutil.rmtree(entry, ignore_errors=True)  # an interrupted build
        path, net = build_bundle(entry / "bundle", image_size=image_size, seed=seed, int8=int8)
        torch.save(net.state_dict(), entry / "net.pt")
        (entry / "complete").touch()
        return path, net
    net = build_resnet50(for_training=False)
    net.load_state_dict(torch.load(entry / "net.pt", weights_only=True))
    return entry / "bundle", net.eval()


def build_bundle(dest: Path, image_size: int = TEST_IMAGE_SIZE, seed: int = 0, calibration: int = 16,
                 int8_accepted: bool = False, int8: bool = True, gate_images: int = 32, ood: bool = True,
                 profile: str = "test"):
    """Export a random ResNet-50 as a complete bundle; returns (bundle dir, torch module).

    The engine gate set holds ``gate_images`` other real X-rays with their true labels, as an export stores it.
    ``ood``: an out-of-distribution detector (model.ood) fitted as an export fits it, on the calibration films'
    pooled features, its cut-off on the gate films' (both real X-rays), and the ``intended_use`` record; the refer
    band is the middle 40 % of the calibration films' probabilities, so that tests see every decision.
    """
    import torch

    from model.bundle import make_session, run_images, write_bundle
    from model.engine_gate import write_gate_set
    from model.export import export_onnx, quantize_int8
    from model.network import build_resnet50
    from model.preprocessing import PreprocessConfig, load_resized

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = xray_files(per_class=calibration // 2, offset=100)
    raw = PreprocessConfig(image_size=image_size)
    images = np.stack([load_resized(f.read_bytes(), raw).pixels for f in files])
    per_image = images.reshape(len(images), -1).mean(axis=1)
    config = PreprocessConfig(image_size=image_size, mean=round(float(images.mean() / 255), 6),
                              std=round(float((images / 255.0).std()), 6),
                              train_intensity_mean=round(float(per_image.mean()), 4),
                              train_intensity_std=round(float(per_image.std()), 4))
    torch.manual_seed(seed)
    net = build_resnet50(for_training=False).eval()
    export_onnx(net, image_size, dest / "model.onnx")
    if int8:
        quantize_int8(dest / "model.onnx", dest / "model.int8.onnx", images, config)
    session = make_session(dest / "model.onnx", threads=2)
    logits, features = run_images(session, images, config, with_features=True)
    temperature = float(max(np.std(logits), 1e-3))
    probs = 1 / (1 + np.exp(-logits / temperature))
    from model.evaluation import reference_distribution

    threshold = float(np.median(probs))
    low, high = (float(v) for v in np.quantile(probs, [0.3, 0.7]))
    meta = {"model_name": "pneumonia", "arch": "resnet50", "preprocess": config.to_dict(),
            "threshold": threshold, "threshold_method": "test-median", "temperature": temperature,
            "refer_band": {"low": min(low, threshold), "high": max(high, threshold), "target": 0.97},
            "metrics": {}, "int8": {"accepted": int8_accepted, "reason": "test bundle", "max_auc_drop": 0.003},
            "reference": reference_distribution(probs, threshold, "calibration"),
            "training": {"profile": profile}}
    gate_files = xray_files(per_class=max(gate_images, 16) // 2, offset=200)
    gate_pixels = np.stack([load_resized(f.read_bytes(), config).pixels for f in gate_files])
    gate_labels = np.array([int(f.parent.name == "PNEUMONIA") for f in gate_files])
    tolerance = None
    if ood:
        from model.ood import fit_detector

        labels = np.array([int(f.parent.name == "PNEUMONIA") for f in files])
        _, gate_features = run_images(session, gate_pixels, config, with_features=True)
        detector, ood_meta = fit_detector(features, labels, gate_features)
        detector.save(dest)
        tolerance = ood_meta["score_tolerance"]
        meta["intended_use"] = {"population": "children aged 1 to 5 years", "views": "frontal", "source": "test",
                                "age_limit_years": 18.0, "profile": profile, "demonstration": False,
                                "registered": {"split": "test", "n": len(files), "auc": 0.5}, "ood": ood_meta}
    if gate_images:
        meta["engine_gate"] = write_gate_set(dest, gate_pixels, gate_labels, session, config, temperature,
                                             count=gate_images, ood_score_tolerance=tolerance)
    write_bundle(dest, meta)
    return dest, net


def register(bundle_dir: Path, tracking_uri: str, name: str = "pneumonia", alias: str | None = "champion") -> str:
    """Register the bundle folder as a new version of ``name`` (no MLflow run needed); returns the version."""
    from model.bundle import Bundle
    from model.registry import connect

    client = connect(tracking_uri)
    try:
        client.get_registered_model(name)
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(name)
    version = client.create_model_version(name, source=str(bundle_dir),
                                          tags={"bundle_sha256": Bundle.load(bundle_dir).sha256}).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)



def spawn_server(argv: list[str], log: Path, env: dict | None = None):
    """Start one server process (``python -m serving.*_main ...``); see :func:`wait_ready`."""
    import subprocess
    import sys

    out = open(log, "ab", buffering=0)
    process = subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    process.log = log
    return process


def wait_ready(process, ready_url: str, timeout: float = 300.0):
    """Wait until ``ready_url`` answers 200 (raises with the log's tail if the process dies or never does)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[2]} exited with {process.returncode}: {process.log.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"{process.args[2]} not ready within {timeout:.0f} s: {process.log.read_text()[-2000:]}")


def stop_server(process) -> int:
    import signal
    import subprocess

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
def dicom_from_image(data: bytes) -> bytes:
    """An encoded image's own gray pixels as an 8-bit MONOCHROME2 DICOM. The window 128/256 is the identity
    for 8-bit data (PS3.3 C.11.2.1.2.1), so the file shows exactly the image's pixels."""
    import io

    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("xray.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    # the identifiers any DICOM sender needs (storescu refuses a file without its SOP class and instance)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def first_line(process, timeout: float) -> str:
    """The first line ``process`` prints on stdout within ``timeout`` seconds ("" if none); later lines are read
    and dropped in a thread, so that the process never blocks on a full pipe."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def serve_until_ready(args: list[str], env: dict, cwd: Path, log: Path, timeout: float = 300.0):
    """Start ``pneumoscope serve ARGS --log-file LOG`` as a real process and wait for its ``READY {json}`` line.

    Returns (process, info); fails the test with the stack's stderr and log when no READY line comes.
    """
    import json
    import subprocess
    import sys

    import pytest

    process = subprocess.Popen([sys.executable, "-m", "model.cli", "serve", *args, "--log-file", str(log)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    line = first_line(process, timeout)
    if not line.startswith("READY "):
        process.kill()
        tail = log.read_text()[-3000:] if log.exists() else ""
        pytest.fail(f"no READY line (got {line!r}); stderr: {process.stderr.read()[-2000:]}\nlog: {tail}")
    return process, json.loads(line[len("READY "):])
