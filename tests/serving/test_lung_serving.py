"""Lung fields in serving: a lung-cropped version's served pixels are its training cache's, bit for bit, and the
predictor returns the lung mask, the CAM lung share and the input box (the transport's client reads them)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lung_fixtures import darkness_segmenter
from serving_fixtures import build_bundle, require_data


def _predictor_request(uploads):
    from kserve.protocol.infer_type import InferRequest

    from serving.predictor_client import PredictorClient

    request = PredictorClient("127.0.0.1:1", "grpc-v2", "pneumonia")._request(uploads, "r1")
    return InferRequest.from_grpc(request.to_grpc())  # as it arrives over gRPC


@pytest.mark.parametrize("lung_crop", ["box", "box+mask"])
def test_lung_cropped_pixels_equal_the_training_cache(tmp_path, shared_full, lung_crop):
    """`data prepare --lung-crop` (decode workers, the segmenter on one thread) and the predictor (transformer
    stage 1, the gRPC transport, the segmenter on all threads, stage 2) give bit-identical model inputs, and the
    crop is not vacuous: most boxes are strictly inside the film."""
    from model.data import CACHE_LUNG_DIR, CachedData, SplitFractions, prepare
    from model.lung_fields import LungSegmenter
    from model.transforms import EvalTransform
    from serving.inputs import decode_upload
    from serving.predictor import PneumoniaPredictor
    from serving.settings import ServingSettings

    root = tmp_path / "data" / "train"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((shared_full / "train" / cls).iterdir())[30:36]:
            shutil.copy(f, root / cls / f.name)
    lungs = darkness_segmenter(tmp_path / "lungs")
    prepare(str(tmp_path / "data"), tmp_path / "cache", 96, SplitFractions(0.25, 0.0, 0), workers=1,
            lung_model=lungs, lung_crop=lung_crop)
    cache = CachedData.load(tmp_path / "cache")
    assert cache.config.lung_crop == lung_crop
    settings = ServingSettings()
    predictor = PneumoniaPredictor("pneumonia", "unused", settings)
    predictor.config, predictor.model_version = cache.config, "7"
    predictor.lungs = LungSegmenter.from_folder(tmp_path / "cache" / CACHE_LUNG_DIR)  # what the bundle carries
    rows = list(cache.manifest)
    uploads = [decode_upload((tmp_path / "data" / row["file"]).read_bytes(), settings).pixels for row in rows]
    received = _predictor_request(uploads)
    predictor._check_preprocessing(received)
    served, masks, boxes = predictor.model_inputs(predictor._images(received))
    expected = np.stack([EvalTransform(cache.config)(cache.images[row["index"]]) for row in rows])
    assert served.shape == expected.shape == (len(rows), 1, 96, 96)
    assert np.array_equal(served, expected), "served model input differs from the lung-cropped training cache"
    inside = [(b[0] > 0 or b[1] > 0 or b[2] < 1 or b[3] < 1) for b in boxes.tolist()]
    assert sum(inside) >= len(rows) // 2, boxes


def _with_lungs(bundle_dir: Path, dest: Path, lungs: Path) -> Path:
    from model.bundle import BUNDLE_FILE, write_bundle

    shutil.copytree(bundle_dir, dest)
    shutil.copyfile(lungs / "lung.onnx", dest / "lung.onnx")
    meta = json.loads((dest / BUNDLE_FILE).read_text())
    meta["lung_segmentation"] = dict(json.loads((lungs / "lung.json").read_text()), onnx="lung.onnx")
    write_bundle(dest, {k: v for k, v in meta.items() if k not in ("files", "bundle_sha256", "format")})
    return dest


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory) -> Path:
    require_data()
    path, _ = build_bundle(tmp_path_factory.mktemp("lung-serving") / "bundle", int8=False, gate_images=16)
    return path


@pytest.mark.parametrize("with_lungs", [True, False])
def test_the_predictor_returns_the_lung_mask_and_share(plain_bundle, tmp_path, with_lungs):
    from model.bundle import Bundle
    from model.lung_fields import LungSegmenter, crop, lung_share, resize_mask
    from model.quality import lung_fields
    from serving.inputs import decode_upload
    from serving.predictor import PneumoniaPredictor
    from serving.predictor_client import PredictorClient
    from serving.settings import ServingSettings
    from serving_fixtures import xray_files

    lungs = darkness_segmenter(tmp_path / "lungs")
    folder = _with_lungs(plain_bundle, tmp_path / "bundle", lungs) if with_lungs else plain_bundle
    settings = ServingSettings(threads=2, max_batch_size=4, engine="onnxruntime",
                               model_sha256=Bundle.load(folder, verify=False).sha256)
    predictor = PneumoniaPredictor("pneumonia", str(folder), settings)
    assert predictor.load()
    try:
        uploads = [decode_upload(f.read_bytes(), settings).pixels for f in xray_files(per_class=2, offset=300)]
        response = asyncio.run(predictor.predict(_predictor_request(uploads)))
    finally:
        predictor.stop()
    answer = PredictorClient("127.0.0.1:1", "grpc-v2", "pneumonia")._answer(response, len(uploads))
    assert answer.lung_mask.shape == (len(uploads), 128, 128) and set(np.unique(answer.lung_mask)) <= {0, 1}
    np.testing.assert_array_equal(answer.input_box, np.tile([0.0, 0.0, 1.0, 1.0], (len(uploads), 1)))
    if with_lungs:
        segmenter = LungSegmenter.from_folder(lungs)
        expected = [segmenter.mask(u) for u in uploads]
        assert answer.lung_mask_source == ["segmentation"] * len(uploads)
    else:
        expected = [lung_fields(128, 128)] * len(uploads)
        assert answer.lung_mask_source == ["ellipse_prior"] * len(uploads)
    for got, mask, cam, share, box in zip(answer.lung_mask, expected, answer.cam, answer.lung_share,
                                          answer.input_box):
        np.testing.assert_array_equal(got.astype(bool), resize_mask(mask, 128, 128))  # sent at 128 x 128
        reference = lung_share(cam, crop(mask, tuple(box)))
        assert share == pytest.approx(-1.0 if np.isnan(reference) else reference, abs=1e-6)
