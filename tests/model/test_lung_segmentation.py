"""The lung U-Net: it learns, its ONNX graph is the PyTorch module (within a derived bound), and the bundle
carries and hashes it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lung_fixtures import synthetic_lung_pairs
from model.lung_fields import LungModelInfo, LungSegmenter, segmentation_input
from model.lung_segmentation import (LungTrainSettings, build_unet, dice_per_image, load_pairs, predict_masks,
                                     split_patients, torch_logits, train_lung_model)

#: float32 unit roundoff, and the concentration parameter of the bound below (Higham & Mary's lambda)
U32 = float(np.finfo(np.float32).eps) / 2
LAMBDA = 7.0
TINY = dict(size=32, batch_size=8, channels=(4, 8, 16), res_units=1, lr=1e-2, n_bootstrap=100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lungs")
    data = synthetic_lung_pairs(root / "data", n=48, size=64)
    info = train_lung_model(data, root / "model", LungTrainSettings(epochs=6, **TINY), threads=2)
    return data, root / "model", info


def test_split_is_by_patient():
    patients = np.repeat(np.arange(40).astype(str), 3)
    split = split_patients(patients, 0.15, 0.15, seed=0)
    for side_a, side_b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(patients[split == side_a]) & set(patients[split == side_b])
    assert {"train", "val", "test"} == set(split.tolist())


def test_dice_by_hand():
    pred = np.zeros((2, 4, 4), bool)
    truth = np.zeros((2, 4, 4), bool)
    pred[0, :2], truth[0, :, :2] = True, True  # 8 and 8 pixels, 4 shared: 2*4/16
    np.testing.assert_allclose(dice_per_image(pred, truth), [0.5, 1.0])  # two empty masks agree


def test_the_unet_learns_the_lung_fields(trained):
    """Test-patient Dice after a few epochs on synthetic films: far above the untrained network's and above
    calling the whole film lung (2A / (1 + A) for a lung share A), and val Dice rose during training."""
    data, folder, info = trained
    images, masks, patients = load_pairs(data, 32)
    split = split_patients(patients, 0.15, 0.15, 42)
    test = split == "test"
    torch.manual_seed(42)
    untrained = build_unet(TINY["channels"], TINY["res_units"])
    lung_info = LungModelInfo.from_dict(info)
    before = dice_per_image(predict_masks(untrained, images[test], lung_info), masks[test]).mean()
    area = masks[test].mean()
    everything = 2 * area / (1 + area)
    assert info["dice"]["test"] > max(before, everything) + 0.2, (info["dice"], before, everything)
    history = json.loads((folder / "history.json").read_text())
    assert max(h["val_dice"] for h in history) > history[0]["val_dice"]
    assert info["dice"]["test_ci95"][0] <= info["dice"]["test"] <= info["dice"]["test_ci95"][1]
    assert info["dice"]["n_test_patients"] == len(set(patients[test].tolist()))


def rounding_bound(net: nn.Module, x: np.ndarray, samples: int = 8, seed: int = 0) -> np.ndarray:
    """Per output element: how far two correct float32 implementations of ``net`` may put it apart.

    The first-order rounding model of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019): every output y_i of a
    layer carries a rounding error of at most u * m_i per operation, m_i the magnitude of what it sums
    ((|W| * |a|)_i + |b| for a convolution of fan-in K, with K + 3 roundings; |x - mean| |gamma| / sigma + |beta|
    for an instance norm, whose mean and variance are sums over the H*W pixels; |y| for an activation or a
    residual sum), independent and mean-zero. This is propagated to the output in float64 by Monte Carlo:
    each layer output is perturbed by u * m_i * sqrt(n_i) * N(0, 1), and the spread of the output over the
    samples is sigma; two independent implementations lie within LAMBDA * sqrt(2) * sigma (2 exp(-LAMBDA^2/2),
    2e-11, per element under the Gaussian model). The bound follows from the network's own magnitudes, not
    from what one CPU shows."""
    from monai.networks.blocks import ResidualUnit

    net = net.double().eval()
    generator = torch.Generator().manual_seed(seed)
    state = {"noise": False}

    def perturb(module, inputs, out):
        if not state["noise"]:
            return out
        a = inputs[0]
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            conv = nn.functional.conv2d if isinstance(module, nn.Conv2d) else nn.functional.conv_transpose2d
            kwargs = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
            if isinstance(module, nn.ConvTranspose2d):
                kwargs["output_padding"] = module.output_padding
            m = conv(a.abs(), module.weight.abs(), None, **kwargs)
            if module.bias is not None:
                m = m + module.bias.abs().reshape(1, -1, 1, 1)
            n = module.weight[0].numel() + 3
        elif isinstance(module, nn.InstanceNorm2d):
            mean = a.mean(dim=(2, 3), keepdim=True)
            sd = torch.sqrt(a.var(dim=(2, 3), unbiased=False, keepdim=True) + module.eps)
            gamma = module.weight.abs().reshape(1, -1, 1, 1) if module.affine else 1.0
            beta = module.bias.abs().reshape(1, -1, 1, 1) if module.affine else 0.0
            m = (a - mean).abs() / sd * gamma + beta
            n = 3 + 2 * a.shape[-1] * a.shape[-2]
        else:  # PReLU, a residual sum: one rounding of what comes out
            m, n = out.abs(), 1
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        return out + U32 * m * math.sqrt(n) * noise

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d, nn.PReLU, ResidualUnit)
    handles = [mod.register_forward_hook(perturb) for mod in net.modules() if isinstance(mod, kinds)]
    try:
        with torch.no_grad():
            x64 = torch.from_numpy(np.asarray(x, dtype=np.float64))
            exact = net(x64)
            state["noise"] = True
            spread = torch.stack([net(x64) - exact for _ in range(samples)])
    finally:
        for handle in handles:
            handle.remove()
        net.float()
    sigma = torch.sqrt((spread ** 2).mean(dim=0))
    return (LAMBDA * math.sqrt(2) * sigma).numpy()


def test_onnx_matches_torch_within_the_rounding_bound(trained):
    """The exported graph and the PyTorch module compute the same logits up to rounding, and the served masks
    (ONNX Runtime, one image per run) are the module's wherever a logit is further than that from 0."""
    from lung_fixtures import lung_ellipses, synthetic_film

    _, folder, info = trained
    lung_info = LungModelInfo.from_dict(info)
    net = build_unet(TINY["channels"], TINY["res_units"])
    net.load_state_dict(torch.load(folder / "lung.pt", weights_only=True))
    net.eval()
    rng = np.random.default_rng(5)
    films = [synthetic_film(lung_ellipses(64, rng), rng) for _ in range(4)]
    segmenter = LungSegmenter.from_folder(folder)
    for film in films:
        x = segmentation_input(film, lung_info)
        bound = rounding_bound(net, x)[0, 0]
        reference = torch_logits(net, film, lung_info)
        served = segmenter.logits(film)
        assert np.all(np.abs(served - reference) <= bound), float(np.max(np.abs(served - reference) - bound))
        # a wrong graph, weight or normalisation moves logits by far more than the bound
        assert float(np.median(bound)) < 1e-3 * float(np.median(np.abs(reference)))
        decided = np.abs(reference) > bound
        np.testing.assert_array_equal(segmenter.mask(film)[decided], (reference > 0)[decided])


def test_the_bundle_carries_and_hashes_the_lung_graph(tiny_model, trained, tmp_path):
    """evaluate_checkpoint(lung_model=...) puts lung.onnx into the bundle, lists its SHA-256, records its Dice,
    and a bundle whose lung graph was altered is refused; the report gains the CAM lung share."""
    from model.bundle import Bundle, BundleError
    from model.evaluation import EvalSettings, evaluate_checkpoint

    _, folder, info = trained
    report = evaluate_checkpoint(tiny_model.checkpoint, tiny_model.cache, tmp_path / "eval",
                                 EvalSettings(n_bootstrap=50, int8=False, gate_images=0), lung_model=folder)
    bundle = Bundle.load(tmp_path / "eval" / "bundle")
    assert "lung.onnx" in bundle.meta["files"]
    assert bundle.meta["lung_segmentation"]["dice"]["test"] == pytest.approx(info["dice"]["test"])
    segmenter = LungSegmenter.from_bundle(bundle)
    film = np.full((50, 40), 120, np.uint8)
    np.testing.assert_array_equal(segmenter.mask(film), LungSegmenter.from_folder(folder).mask(film))
    share = report["cam_lung_share"]["holdout"]
    assert share["source"] == "segmentation" and len(share["per_image"]) == report["splits"]["holdout"]["n"]
    assert bundle.meta["cam_lung_share"]["holdout"]["mean"] == share["all"]["mean"]

    lung = tmp_path / "eval" / "bundle" / "lung.onnx"
    lung.write_bytes(lung.read_bytes()[:-1] + bytes([lung.read_bytes()[-1] ^ 1]))
    with pytest.raises(BundleError, match="lung.onnx"):
        Bundle.load(tmp_path / "eval" / "bundle")


def test_without_a_segmenter_the_share_uses_the_ellipse(tiny_model):
    """A bundle without a lung model measures the share with the project's elliptical prior, and says so."""
    share = tiny_model.report["cam_lung_share"]
    split = "holdout" if "holdout" in share else "val"
    assert share[split]["source"] == "ellipse_prior"
    values = [v for v in share[split]["per_image"] if v is not None]
    assert values and all(0.0 <= v <= 1.0 for v in values)
