"""Export claims: the CAM head computes the plain network's logit, batching changes nothing, and the int8
graph is served exactly when it passed its val-AUC gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from model.bundle import Bundle, make_session, run_images
from model.evaluation import EvalSettings, evaluate_checkpoint
from model.export import int8_gate
from model.network import LogitAndCam, build_resnet50
from model.preprocessing import PreprocessConfig
from numerics import FLOAT64_SAME_FORMULA, U32, network_logit_bound, sum_bound


def _trained_like_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_resnet50(for_training=False)
    for m in net.modules():  # BN statistics and a head bias as after training, not the identity init
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(net.fc[1].weight, std=0.05)
    torch.nn.init.constant_(net.fc[1].bias, 0.3)
    return net.eval()


@pytest.mark.numerics
def test_logit_and_cam_equals_the_plain_networks_logit():
    net = _trained_like_net()
    x = torch.randn(4, 1, 96, 96)
    head = LogitAndCam(net).eval()
    with torch.no_grad():
        plain = net(x).reshape(-1)
        logit, cam = head(x)
    assert logit.shape == (4,) and cam.shape == (4, 3, 3)
    # Two float32 networks of the same function: the head sums the same 2048 x 9 products in another order
    # (pool then dot, against dot then mean). Each is within its rounding bound of the exact value.
    bound = np.sqrt((network_logit_bound(net, x) ** 2 + network_logit_bound(head, x) ** 2) / 2)
    assert (np.abs((logit - plain).numpy()) <= bound).all(), (logit - plain, bound)
    assert (bound < 0.01 * np.abs(plain.numpy())).all(), "the bound must stay far below what a wrong head moves"
    # the CAM's spatial mean plus the bias is the logit: the heatmap explains exactly this score
    recomputed = (cam.mean(dim=(1, 2)) + net.fc[1].bias).detach()
    mean_bound = sum_bound(cam.abs().mean(dim=(1, 2)).numpy() + abs(float(net.fc[1].bias)), cam[0].numel() + 1)
    assert (np.abs((recomputed - logit).numpy()) <= mean_bound).all()


@pytest.mark.integration
def test_a_batch_of_n_equals_n_single_runs(tiny_model):
    from model.preprocessing import normalize
    from model.training import load_checkpoint

    bundle = Bundle.load(tiny_model.bundle)
    config = bundle.preprocess
    session = make_session(bundle.onnx_path("fp32"), threads=1)
    images = np.random.default_rng(0).integers(0, 256, (7, config.image_size, config.image_size), dtype=np.uint8)
    batch_logits, batch_cams = run_images(session, images, config, batch_size=7, with_cam=True)
    singles = [run_images(session, images[i:i + 1], config, batch_size=1, with_cam=True) for i in range(7)]
    # A batch may run other kernel blockings than one image: the same float32 function, rounded otherwise
    head = LogitAndCam(load_checkpoint(tiny_model.checkpoint)[0]).eval()
    x = normalize(images, config)
    logit_bound, cam_bound = network_logit_bound(head, x), network_logit_bound(head, x, output="cam")
    assert (np.abs(batch_logits - np.concatenate([s[0] for s in singles])) <= logit_bound).all()
    cam_difference = np.abs(batch_cams - np.concatenate([s[1] for s in singles])).reshape(len(images), -1)
    assert (cam_difference <= cam_bound).all()
    mixed = run_images(session, images, config, batch_size=3)  # uneven batches: 3 + 3 + 1
    assert (np.abs(mixed - batch_logits) <= logit_bound).all()


# ---------------------------------------------------------------------------------------------------
# the int8 gate, on two tiny ONNX graphs whose val AUCs are known exactly

def _pixel_graph(path, pixel: int, size: int) -> str:
    """logit = the normalised value of one pixel: a 'model' whose ranking the test controls."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])
    logit = helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch"])
    nodes = [helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
             helper.make_node("Gather", ["flat", "index"], ["logit"], axis=1)]
    inits = [helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, size * size]),
             helper.make_tensor("index", TensorProto.INT64, [], [pixel])]
    model = helper.make_model(helper.make_graph(nodes, "pixel", [image], [logit], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def _images(fp32_scores, int8_scores, size=8):
    images = np.zeros((len(fp32_scores), size, size), np.uint8)
    images[:, 0, 0] = fp32_scores
    images[:, 0, 1] = int8_scores
    return images


@pytest.mark.parametrize("swapped_pairs, accepted", [(0, True), (1, True), (2, True), (3, False), (8, False)])
def test_int8_gate_rejects_exactly_above_the_limit(tmp_path, swapped_pairs, accepted):
    config = PreprocessConfig(image_size=8)
    fp32 = make_session(_pixel_graph(tmp_path / "fp32.onnx", 0, 8))
    int8 = make_session(_pixel_graph(tmp_path / "int8.onnx", 1, 8))
    labels = np.array([0] * 8 + [1] * 8)
    fp32_scores = np.arange(16) * 10 + 5  # perfectly ranked: AUC 1
    int8_scores = fp32_scores.copy()
    if swapped_pairs:  # the top negative now outranks `swapped_pairs` positives: that many of 64 pairs wrong
        int8_scores[7] = fp32_scores[7 + swapped_pairs] + 1
    images = _images(fp32_scores, int8_scores)
    report = int8_gate(fp32, int8, images, labels, config, max_auc_drop=2 / 64)
    assert report["auc_fp32"] == 1.0
    # AUCs count pairs: multiples of 1/64, which float64 holds exactly
    assert report["auc_int8"] == pytest.approx(1 - swapped_pairs / 64, abs=FLOAT64_SAME_FORMULA)
    assert report["auc_drop"] == pytest.approx(swapped_pairs / 64, abs=FLOAT64_SAME_FORMULA)
    assert report["accepted"] is accepted and report["max_auc_drop"] == 2 / 64 and report["n"] == 16
    assert report["max_abs_logit_diff"] > 0 or swapped_pairs == 0


def test_int8_gate_accepts_an_int8_graph_that_ranks_better(tmp_path):
    config = PreprocessConfig(image_size=8)
    labels = np.array([0] * 8 + [1] * 8)
    worse = np.arange(16) * 10
    worse[[6, 9]] = worse[[9, 6]]
    images = _images(worse, np.arange(16) * 10)
    report = int8_gate(make_session(_pixel_graph(tmp_path / "a.onnx", 0, 8)),
                       make_session(_pixel_graph(tmp_path / "b.onnx", 1, 8)), images, labels, config, 0.0)
    assert report["auc_drop"] < 0 and report["accepted"]


@pytest.mark.integration
@pytest.mark.parametrize("limit, accepted", [(1.0, True), (-1.0, False)])
def test_auto_serves_int8_exactly_when_it_passed(tiny_model, tmp_path, limit, accepted):
    report = evaluate_checkpoint(tiny_model.checkpoint, tiny_model.cache, tmp_path,
                                 EvalSettings(n_bootstrap=0, int8=True, int8_max_auc_drop=limit,
                                              calibration_images=16))
    assert report["int8"]["accepted"] is accepted and report["int8"]["calibration_images"] == 16
    bundle = Bundle.load(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "model.int8.onnx").exists() is accepted
    assert ("model.int8.onnx" in bundle.meta["files"]) is accepted
    assert bundle.onnx_path("auto").name == ("model.int8.onnx" if accepted else "model.onnx")
    assert bundle.onnx_path("fp32").name == "model.onnx"
    if not accepted:
        from model.bundle import BundleError

        with pytest.raises(BundleError, match="no int8 graph"):
            bundle.onnx_path("int8")


def test_int8_gate_default_limit_and_logit_difference(tmp_path):
    from model.preprocessing import normalize

    config = PreprocessConfig(image_size=8)
    labels = np.array([0] * 8 + [1] * 8)
    fp32_scores = np.arange(16) * 10 + 5
    int8_scores = fp32_scores.copy()
    int8_scores[7] = fp32_scores[8] + 1  # one pair of 64 mis-ordered: a drop of 0.0156 > the default 0.003
    images = _images(fp32_scores, int8_scores)
    report = int8_gate(make_session(_pixel_graph(tmp_path / "a.onnx", 0, 8)),
                       make_session(_pixel_graph(tmp_path / "b.onnx", 1, 8)), images, labels, config)
    assert report["max_auc_drop"] == 0.003 and not report["accepted"]
    x = normalize(images, config)[:, 0]
    # the graphs copy one input pixel each: one float32 subtraction apart, on each side
    expected = float(np.max(np.abs(x[:, 0, 0] - x[:, 0, 1])))
    assert report["max_abs_logit_diff"] == pytest.approx(expected, rel=2 * U32)
