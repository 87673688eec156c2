"""ResNet-50 with a grayscale stem and one pneumonia logit; the CAM head used for export."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50

log = logging.getLogger(__name__)

# torchvision's cache file name for IMAGENET1K_V2; used when present, never downloaded.
IMAGENET_CACHE_NAMES = ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")


def build_resnet50(pretrained: str | Path | None = None, dropout: float = 0.2, for_training: bool = True) -> nn.Module:
    """torchvision ResNet-50, 1 input channel, single-logit head."""
    net = resnet50(weights=None)
    weights_path = _find_imagenet_weights(pretrained) if for_training else None
    gray_backbone = None
    if not for_training:
        pass  # weights come from a checkpoint next
    elif weights_path:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if state.get("conv1.weight") is not None and state["conv1.weight"].shape[1] == 1:
            gray_backbone = state  # a grayscale backbone (``pneumoscope pretrain``): loaded after the stem change
        else:
            net.load_state_dict(state)
            log.info("initialised from ImageNet weights in %s", weights_path)
    else:
        log.info("no ImageNet weights given or cached: training from random initialisation")
    stem = net.conv1
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        # Sum of the RGB filters: a gray image replicated to RGB gives the same response.
        net.conv1.weight.copy_(stem.weight.sum(dim=1, keepdim=True))
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.fc.in_features, 1))
    if gray_backbone is not None:
        missing, unexpected = net.load_state_dict(gray_backbone, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"{weights_path} is not a grayscale ResNet-50 backbone (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        log.info("initialised from the self-supervised grayscale backbone in %s (new head)", weights_path)
    if not weights_path or gray_backbone is not None:
        nn.init.zeros_(net.fc[1].bias)
    return net


def _find_imagenet_weights(pretrained: str | Path | None) -> Path | None:
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained file not found: {path}")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in IMAGENET_CACHE_NAMES:
        if (hub / name).is_file():
            return hub / name
    return None


class LogitAndCam(nn.Module):
    """Forward returning (logit [N], cam [N, h, w]) from ONE pass.

    For global-average-pool + linear, Grad-CAM on layer4 equals the class activation map
    sum_k w_k * A_k (up to the positive factor 1/(h*w) and the ReLU applied when rendering),
    so the heatmap costs nothing extra.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                      net.layer1, net.layer2, net.layer3, net.layer4)
        linear = net.fc[-1] if isinstance(net.fc, nn.Sequential) else net.fc
        # The linear head as a 1x1 convolution: quantisable, and it yields the map directly.
        self.cam = nn.Conv2d(linear.in_features, 1, kernel_size=1, bias=False)
        with torch.no_grad():
            self.cam.weight.copy_(linear.weight.detach().reshape(1, -1, 1, 1))
        self.bias = nn.Parameter(linear.bias.detach().clone().reshape(()), requires_grad=False)

    def forward(self, x: torch.Tensor):
        cam = self.cam(self.features(x))[:, 0]  # [N, h, w]
        logit = cam.mean(dim=(1, 2)) + self.bias
        return logit, cam


#: Position of layer1 in ``LogitAndCam.features`` (conv1, bn1, relu, maxpool, layer1, ...).
LAYER1 = 4


class LogitCamAndFeatures(LogitAndCam):
    """The served graph: (logit [N], cam [N, h, w], features [N, 512]) from ONE pass.

    ``features`` are layer1's 256 channels summarised over space: their means, then their standard deviations
    (population). They describe the film's textures and contrast as the network first sees them, the statistics
    that set another hospital's or machine's films apart; the out-of-distribution detector (``model.ood``) measures
    them, so the check costs no second inference. Why layer1 and not the pooled layer4 vector the head reads: the
    design measurement in BENCHMARKS.md ("Intended use").
    """

    def forward(self, x: torch.Tensor):
        h = x
        for i, stage in enumerate(self.features):
            h = stage(h)
            if i == LAYER1:
                early = h
        cam = self.cam(h)[:, 0]
        logit = cam.mean(dim=(1, 2)) + self.bias
        mean = early.mean(dim=(2, 3))
        # two passes, as numpy's std: E[(x - mean)^2], not E[x^2] - mean^2 (no cancellation)
        std = ((early - mean[:, :, None, None]) ** 2).mean(dim=(2, 3)).sqrt()
        return logit, cam, torch.cat([mean, std], dim=1)
