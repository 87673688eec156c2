"""ONNX export: dynamic batch, logit + CAM outputs, parity with PyTorch on real X-rays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.bundle import Bundle, BundleError, make_session, run_images, write_bundle
from model.export import export_onnx, parity
from model.network import LogitAndCam, build_resnet50
from model.preprocessing import PreprocessConfig, load_resized, normalize
from numerics import network_logit_bound, sum_bound


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = build_resnet50(for_training=False).eval()
    # Non-trivial BN statistics, as after training, so parity is not checked on a degenerate net.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = export_onnx(net, 96, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return net, path


def _real_images(folder, n, size):
    files = sorted((folder / "train" / "PNEUMONIA").iterdir())[:n // 2] + sorted((folder / "train" / "NORMAL").iterdir())[:n - n // 2]
    config = PreprocessConfig(image_size=size)
    return np.stack([load_resized(f.read_bytes(), config).pixels for f in files]), config


@pytest.mark.numerics
def test_onnx_matches_pytorch_within_float32_rounding_on_real_images(exported, shared_full):
    """ONNX Runtime (BatchNorm folded, its own kernels) against PyTorch: within the float32 rounding bound of
    this network on these images (tests/numerics.py), logit and every CAM element."""
    from model.preprocessing import normalize

    net, path = exported
    images, config = _real_images(shared_full, 6, 96)
    report = parity(net, path, images, config)
    head, x = LogitAndCam(net).eval(), normalize(images, config)
    assert report["max_abs_logit_diff"] <= network_logit_bound(head, x).min()
    assert report["max_abs_cam_diff"] <= network_logit_bound(head, x, output="cam").min()


def test_batch_size_is_dynamic_and_cam_is_consistent(exported):
    net, path = exported
    session = make_session(path)
    config = PreprocessConfig(image_size=96)
    rng = np.random.default_rng(0)
    for n in (1, 3, 5):
        images = rng.integers(0, 255, (n, 96, 96), dtype=np.uint8)
        logits, cams = run_images(session, images, config, batch_size=n, with_cam=True)
        assert logits.shape == (n,) and cams.shape == (n, 3, 3)
        bias = float(LogitAndCam(net).bias)
        # the graph's own mean of h*w CAM values plus the bias, recomputed: two roundings of one short sum
        mean_bound = sum_bound(np.abs(cams).mean(axis=(1, 2)) + abs(bias), cams[0].size + 1)
        assert (np.abs(logits - (cams.mean(axis=(1, 2)) + bias)) <= mean_bound).all()


def test_bundle_hash_detects_tampering(exported, tmp_path):
    _, path = exported
    (tmp_path / "model.onnx").write_bytes(path.read_bytes())
    write_bundle(tmp_path, {"preprocess": PreprocessConfig(image_size=96).to_dict(), "threshold": 0.5, "temperature": 1.0})
    bundle = Bundle.load(tmp_path)
    assert bundle.onnx_path("auto").name == "model.onnx"
    with (tmp_path / "model.onnx").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.load(tmp_path)


def test_the_third_output_is_layer1s_mean_and_standard_deviation_over_space(exported, shared_full):
    net, path = exported
    images, config = _real_images(shared_full, 4, 96)
    logits, features = run_images(make_session(path), images, config, with_features=True)
    captured = {}
    hook = net.layer1.register_forward_hook(lambda _m, _i, out: captured.__setitem__("layer1", out))
    try:
        with torch.no_grad():
            reference_logits = net(torch.from_numpy(normalize(images, config))).reshape(-1).numpy()
    finally:
        hook.remove()
    layer1 = captured["layer1"].numpy().astype(np.float64)  # [N, 256, 24, 24] at 96 px
    expected = np.concatenate([layer1.mean(axis=(2, 3)), layer1.std(axis=(2, 3))], axis=1)
    assert features.shape == (4, 512) and (features >= 0).all()  # after a ReLU; standard deviations
    # float32 through ONNX Runtime vs float64 here: the export's parity bound, scaled by the values
    np.testing.assert_allclose(features, expected, atol=1e-4 * (1 + np.abs(expected).max()))
    np.testing.assert_allclose(logits, reference_logits, atol=1e-4 * (1 + np.abs(reference_logits).max()))
    report = parity(net, path, images, config)
    assert report["max_abs_features_diff"] <= 1e-4 * (1 + float(np.abs(features).max()))


def test_the_int8_graph_keeps_the_feature_statistics_in_fp32(exported, shared_full, tmp_path):
    """Squares, means and square roots of 8-bit values would lose the detector's precision: the quantiser leaves the
    whole branch from layer1's output to ``features`` (and the CAM head) in fp32."""
    import onnx

    from model.export import quantize_int8

    _, path = exported
    images, config = _real_images(shared_full, 8, 96)
    int8 = quantize_int8(path, tmp_path / "model.int8.onnx", images, config)
    graph = onnx.load(str(int8)).graph
    producer = {out: n for n in graph.node for out in n.output}
    branch, stack = [], [producer["features"]]
    while stack:  # back from the output to the first dequantised tensor (layer1's output)
        node = stack.pop()
        branch.append(node.op_type)
        if node.op_type != "DequantizeLinear":
            stack.extend(producer[i] for i in node.input if i in producer)
    # every step of mean and std was reached before any dequantised tensor: none of them was quantised
    assert {"Concat", "ReduceMean", "Sqrt", "Pow", "Sub"} <= set(branch)
    assert not {"QuantizeLinear", "QLinearConv", "QLinearMatMul"} & set(branch)
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the trunk itself is int8
