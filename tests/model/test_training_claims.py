"""Training claims on a tiny cache (32 px, a few steps, CPU): seeds, resume, EMA, pos_weight, the
warm-up + cosine schedule, early stopping, --pretrained.

The optimizer and the loss are observed through torch's public classes (a recording AdamW and
BCEWithLogitsLoss), the results through what ``train`` writes (checkpoint.pt, history.json) and returns.
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from claims_fixtures import TINY_SIZE, synthetic_kaggle, tiny_profile
from model.data import SplitFractions, prepare
from model.network import build_resnet50
from model.training import load_checkpoint, train
from numerics import FLOAT64_SAME_FORMULA, U32, sum_bound

pytestmark = pytest.mark.integration

PROFILE = dict(epochs=3, max_steps_per_epoch=2, warmup_epochs=1.5, patience=10, lr=3e-3, ema_decay=0.9)


class Interrupted(Exception):
    pass


class Recorder:
    """Records every AdamW step (learning rate, parameters after the step) and the loss's pos_weight."""

    def __init__(self, monkeypatch):
        self.optimizers, self.pos_weights, self.lrs, self.snapshots = [], [], [], []
        recorder = self

        class RecordingAdamW(torch.optim.AdamW):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                recorder.optimizers.append(self)

            def step(self, closure=None):
                recorder.lrs.append(self.param_groups[0]["lr"])
                result = super().step(closure)
                recorder.snapshots.append([p.detach().clone() for p in self.param_groups[0]["params"]])
                return result

        class RecordingLoss(torch.nn.BCEWithLogitsLoss):
            def __init__(self, *args, pos_weight=None, **kwargs):
                super().__init__(*args, pos_weight=pos_weight, **kwargs)
                recorder.pos_weights.append(None if pos_weight is None else float(pos_weight))

        monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
        monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss", RecordingLoss)

    def raw_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.optimizers[-1].param_groups[0]["params"]]


PARAM_NAMES = [name for name, _ in build_resnet50(None, for_training=False).named_parameters()]


def checkpoint_params(path) -> list[torch.Tensor]:
    net, _ = load_checkpoint(path)
    params = dict(net.named_parameters())
    return [params[name].detach() for name in PARAM_NAMES]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_claims")
    data = synthetic_kaggle(root / "data", {"NORMAL": 10, "PNEUMONIA": 16}, seed=5)
    prepare(str(data), root / "cache", TINY_SIZE, SplitFractions(val=0.3, holdout=0.0, seed=0), workers=1)
    return root / "cache"


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    monkeypatch = pytest.MonkeyPatch()
    recorder = Recorder(monkeypatch)
    out = tmp_path_factory.mktemp("reference")
    try:
        result = train(cache, out, tiny_profile(**PROFILE), seed=11, device="cpu")
    finally:
        monkeypatch.undo()
    yield result, recorder, out
    shutil.rmtree(out, ignore_errors=True)  # half a GB of checkpoints that no other module reads


def _same(a: list[torch.Tensor], b: list[torch.Tensor], bound: list[torch.Tensor] | None = None) -> bool:
    """Identical, or within ``bound`` (per element) where one is given."""
    if bound is None:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return all(bool(((x.double() - y.double()).abs() <= e).all()) for x, y, e in zip(a, b, bound, strict=True))


def _ema_rounding(snapshots: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """How far the float32 EMA of the product (one torch._foreach_lerp_ a step: a + w (b - a), with w = 1 - decay
    rounded too) may lie from the float64 recomputation: at most 7 roundings of terms no larger than the
    largest weight M seen, per step; an earlier step's error only shrinks (times decay < 1); then one more
    rounding to float32. So (7 steps + 1) u M, per element."""
    largest = [torch.stack([s[i].double().abs() for s in snapshots]).amax(dim=0) for i in range(len(snapshots[0]))]
    return [(7 * len(snapshots) + 1) * U32 * m for m in largest]


def _train_labels(cache) -> np.ndarray:
    with (cache / "manifest.csv").open() as fh:
        return np.array([int(r["label"]) for r in csv.DictReader(fh) if r["split"] == "train"])


def test_pos_weight_is_the_class_ratio(reference_run, cache):
    _, recorder, _ = reference_run
    labels = _train_labels(cache)
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    assert n_pos != n_neg, "the test needs unbalanced classes"
    assert recorder.pos_weights == [pytest.approx(n_neg / n_pos, rel=U32)]  # the loss holds it as float32


def test_warmup_then_cosine_schedule_follows_its_formula(reference_run):
    _, recorder, out = reference_run
    steps_per_epoch, epochs, peak = PROFILE["max_steps_per_epoch"], PROFILE["epochs"], PROFILE["lr"]
    total, warmup = steps_per_epoch * epochs, int(PROFILE["warmup_epochs"] * steps_per_epoch)

    def expected(step):  # linear warm-up to the peak, then cosine down to 1 % of it
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / (total - warmup)
        return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))

    # float64 on both sides, the same formula: a few roundings of u = 1.1e-16 apart
    assert recorder.lrs == pytest.approx([expected(s) for s in range(total)], rel=FLOAT64_SAME_FORMULA)
    history = json.loads((out / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([expected((e + 1) * steps_per_epoch) for e in range(epochs)],
                                                       rel=FLOAT64_SAME_FORMULA)


def test_ema_weights_differ_from_raw_and_are_the_checkpointed_ones(reference_run):
    result, recorder, out = reference_run
    decay = PROFILE["ema_decay"]
    # the documented EMA: the first update copies the weights, then decay ramps up as min(decay, (1+n)/(10+n))
    ema, per_epoch = None, []
    for n, snapshot in enumerate(recorder.snapshots):
        if ema is None:
            ema = [p.double().clone() for p in snapshot]
        else:
            d = min(decay, (1.0 + n) / (10.0 + n))
            ema = [a * d + p.double() * (1 - d) for a, p in zip(ema, snapshot)]
        if (n + 1) % PROFILE["max_steps_per_epoch"] == 0:
            per_epoch.append([a.float() for a in ema])
    saved = checkpoint_params(result.checkpoint)
    best = result.best_epoch - 1
    rounding = _ema_rounding(recorder.snapshots)
    assert _same(saved, per_epoch[best], rounding), "checkpoint.pt does not hold the EMA of the best epoch"
    raw = recorder.snapshots[(best + 1) * PROFILE["max_steps_per_epoch"] - 1]
    # further apart than the EMA's rounding could put them: really other weights
    assert not _same(saved, raw, rounding), "checkpoint.pt holds the raw weights, not the EMA"
    assert not _same(recorder.raw_weights(), per_epoch[-1], rounding)


def test_same_seed_gives_the_same_weights(reference_run, cache, tmp_path, monkeypatch):
    result, recorder, out = reference_run
    again = Recorder(monkeypatch)
    second = train(cache, tmp_path, tiny_profile(**PROFILE), seed=11, device="cpu")
    assert _same(again.raw_weights(), recorder.raw_weights())
    assert _same(checkpoint_params(second.checkpoint), checkpoint_params(result.checkpoint))
    assert json.loads((tmp_path / "history.json").read_text())[0]["train_loss"] == \
        json.loads((out / "history.json").read_text())[0]["train_loss"]
    assert not _same(recorder.snapshots[0], recorder.snapshots[-1]), "training changed nothing"


def test_resumed_run_ends_with_the_uninterrupted_weights(reference_run, cache, tmp_path, monkeypatch):
    result, recorder, out = reference_run

    def crash(record):
        if record["epoch"] == 1:
            raise Interrupted("simulated crash after epoch 1")

    with pytest.raises(Interrupted):
        train(cache, tmp_path, tiny_profile(**PROFILE), seed=11, device="cpu", on_epoch=crash)
    resumed = Recorder(monkeypatch)
    second = train(cache, tmp_path, tiny_profile(**PROFILE), seed=11, device="cpu")
    assert len(resumed.lrs) == (PROFILE["epochs"] - 1) * PROFILE["max_steps_per_epoch"], "it did not resume"
    # the same float32 operations on the same kernels in one process, from float32 state and RNG states restored
    # exactly: identical, not merely close (as the same seed is)
    assert _same(resumed.raw_weights(), recorder.raw_weights())
    assert _same(checkpoint_params(second.checkpoint), checkpoint_params(result.checkpoint))
    ours = json.loads((tmp_path / "history.json").read_text())
    theirs = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in ours] == [1, 2, 3]
    for a, b in zip(ours, theirs):
        assert a["train_loss"] == b["train_loss"] and a["lr"] == b["lr"]


def test_early_stopping_at_patience_and_pretrained_weights(cache, tmp_path, monkeypatch):
    """Val normals all one dark frame, val pneumonias all one bright frame: each epoch's val AUC is exactly 0
    or 1 (round-off between batch rows cannot reorder them), and with lr 0 it cannot improve after epoch 1.
    lr 0 also keeps the weights where --pretrained put them."""
    flat = tmp_path / "cache"
    shutil.copytree(cache, flat)
    images = np.load(flat / "images.npy")
    with (flat / "manifest.csv").open() as fh:
        val = [(int(r["index"]), int(r["label"])) for r in csv.DictReader(fh) if r["split"] == "val"]
    for index, label in val:
        images[index] = 200 if label else 40
    np.save(flat / "images.npy", images)

    torch.manual_seed(123)
    imagenet_like = build_resnet50(None, for_training=False)
    rgb_stem = torch.randn(64, 3, 7, 7)
    state = {k: v for k, v in imagenet_like.state_dict().items() if not k.startswith(("fc.", "conv1."))}
    state.update({"conv1.weight": rgb_stem, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    weights = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, weights)

    recorder = Recorder(monkeypatch)
    result = train(flat, tmp_path / "run", tiny_profile(epochs=8, patience=2, lr=0.0, max_steps_per_epoch=1,
                                                        batch_size=16), pretrained=str(weights), seed=0, device="cpu")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    first = history[0]["val_auc"]
    assert first in (0.0, 1.0) and [h["val_auc"] for h in history] == [first] * 3
    assert len(history) == 1 + 2 and result.best_epoch == 1, "training must stop after `patience` stale epochs"

    trained, _ = load_checkpoint(result.checkpoint)
    got = dict(trained.named_parameters())
    gray_stem = rgb_stem.sum(dim=1, keepdim=True)  # a sum of 3 values, in whatever order the product sums them
    assert ((got["conv1.weight"] - gray_stem).abs() <= sum_bound(rgb_stem.abs().sum(dim=1, keepdim=True), 3)).all(), \
        "the stem is not the given RGB stem"
    for name in ("layer1.0.conv1.weight", "layer4.2.conv3.weight", "layer2.1.bn2.weight"):
        assert torch.equal(got[name], state[name]), name
    assert len(recorder.lrs) == 3 and set(recorder.lrs) == {0.0}


def test_missing_pretrained_file_is_a_clear_error(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="--pretrained file not found"):
        train(cache, tmp_path, tiny_profile(), pretrained=str(tmp_path / "nope.pth"), device="cpu")


def test_budget_caps_from_the_environment_only_shorten_a_profile(monkeypatch):
    """PNEUMOSCOPE_MAX_EPOCHS / _MAX_STEPS_PER_EPOCH (the documented commands' test runs the README's training
    with them) cap any profile and never lengthen one; unset, the profile is untouched."""
    from model.profiles import get_profile
    from model.training import capped

    cpu, smoke = get_profile("cpu"), get_profile("smoke")
    assert capped(cpu) == cpu and capped(smoke) == smoke
    monkeypatch.setenv("PNEUMOSCOPE_MAX_EPOCHS", "1")
    monkeypatch.setenv("PNEUMOSCOPE_MAX_STEPS_PER_EPOCH", "2")
    assert (capped(cpu).epochs, capped(cpu).max_steps_per_epoch) == (1, 2)
    assert capped(cpu).image_size == cpu.image_size and capped(cpu).batch_size == cpu.batch_size
    monkeypatch.setenv("PNEUMOSCOPE_MAX_EPOCHS", str(cpu.epochs + 5))
    monkeypatch.setenv("PNEUMOSCOPE_MAX_STEPS_PER_EPOCH", str(smoke.max_steps_per_epoch + 5))
    assert capped(cpu).epochs == cpu.epochs and capped(smoke).max_steps_per_epoch == smoke.max_steps_per_epoch
