"""Issue 16's evidence test: the CAM lung share tells a model that reads a marker outside the lungs from one
that reads the lungs.

Synthetic 64 px films (two darker elliptical lungs, known masks). In the "marker" set, every PNEUMONIA film
carries a bright square in the lower right corner, outside the lungs, and nothing else tells the classes
apart; in the "clean" set, PNEUMONIA films carry an opacity inside one lung and no marker. A small CNN with
the served model's head (global average pooling + one linear logit, whose class activation map is the
``cam`` output's formula, ``model.network.LogitAndCam``) is trained on each, and its CAMs on held-out films are
measured with :func:`model.lung_evaluation.cam_lung_share` against the true lung masks. The reference levels
are the lungs' share of the film (what a CAM spread evenly would score) and the clean model's share. A small
CNN (stride 8: an 8 x 8 CAM on 64 px films) keeps the test to about a minute on 2 idle cores; the ResNet-50's
own shares on real films are in BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np
import torch

from lung_fixtures import lung_ellipses, synthetic_film

SIZE = 64


def _films(kind: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    films, masks, labels = [], [], []
    for i in range(n):
        label = i % 2
        mask = lung_ellipses(SIZE, rng)
        film = synthetic_film(mask, rng).astype(np.float32)
        if label and kind == "marker":
            y, x = rng.integers(SIZE - 13, SIZE - 9), rng.integers(SIZE - 13, SIZE - 9)  # the lower right corner
            film[y:y + 8, x:x + 8] = 255.0
        if label and kind == "clean":
            ys, xs = np.nonzero(mask)
            k = rng.integers(len(ys))
            yy, xx = np.mgrid[:SIZE, :SIZE]
            film += 110.0 * np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * 7.0 ** 2)) * mask
        films.append(np.clip(film, 0, 255).astype(np.uint8))
        masks.append(mask)
        labels.append(label)
    return films, np.stack(masks), np.array(labels)


class SmallCam(torch.nn.Module):
    """Conv features, global average pooling, one linear logit; ``cam`` = the linear head applied per position."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width, stride in ((16, 2), (32, 2), (32, 2), (32, 1)):  # stride 8: an 8 x 8 CAM at 64 px
            layers += [torch.nn.Conv2d(channels, width, 3, stride=stride, padding=1), torch.nn.ReLU()]
            channels = width
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        cam = self.head(self.features(x))[:, 0]
        return cam.mean(dim=(1, 2)), cam  # (logit, CAM): GAP then linear == linear then GAP


def _tensor(films) -> torch.Tensor:
    return torch.from_numpy((np.stack(films).astype(np.float32) / 255.0 - 0.5) / 0.25)[:, None]


def _train_and_measure(kind: str):
    from model.lung_evaluation import cam_lung_share
    from model.metrics import auc

    torch.manual_seed(0)
    net = SmallCam()
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-3)
    for step in range(200):  # fresh films every step: nothing to memorise
        films, _, labels = _films(kind, 32, seed=step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(_tensor(films))[0],
                                                                    torch.from_numpy(labels.astype(np.float32)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    films, masks, labels = _films(kind, 120, seed=10_000)  # held out
    with torch.no_grad():
        logits, cams = net.eval()(_tensor(films))

    class Truth:  # the known lungs of each held-out film, in the segmenter's place
        def __init__(self):
            self.masks = iter(masks)

        def mask(self, _pixels):
            return next(self.masks)

    share = cam_lung_share(cams.numpy(), np.stack(films), labels, Truth(), n_boot=500, seed=0)
    return auc(labels, logits.numpy()), share, float(masks.mean())


def test_a_marker_shortcut_shows_as_a_low_lung_share():
    marker_auc, marker, area = _train_and_measure("marker")
    clean_auc, clean, _ = _train_and_measure("clean")
    # both models learned their set: the measure is about where they look, not whether they work
    assert marker_auc > 0.9 and clean_auc > 0.9, (marker_auc, clean_auc)
    low, high = marker["PNEUMONIA"], clean["PNEUMONIA"]
    # the marker model's evidence on its positives lies outside the lungs: below what an evenly spread CAM would
    # score, and below the clean model's, each beyond its bootstrap CI (the clean model's coarse CAM, upsampled,
    # spills over the thin synthetic lungs' edges: higher, not necessarily above the lungs' area)
    assert low["ci95"][1] < area, (low, area)
    assert low["ci95"][1] < high["ci95"][0], (low, high)
