"""Training speed-ups keep the recipe's behaviour; torchrun/DDP gives the single-process step.

The DDP check runs on CPU with the gloo backend and 2 processes. BatchNorm is held in eval mode (running
statistics) for the weight comparison: in train mode every process normalises with the statistics of its own
16 images, which by definition differs from one batch of 32 (that is what per-GPU BatchNorm is, not a DDP
error; `--sync-bn` makes them equal on GPUs, and PyTorch's SyncBatchNorm has no CPU kernel). With BN
statistics fixed and dropout off, DDP's contract - gradients averaged over the processes - must reproduce the
batch-32 gradient and therefore the batch-32 AdamW step.
"""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import SplitFractions, prepare
from model.preprocessing import PreprocessConfig, normalize
from model.profiles import get_profile
from numerics import U32, adamw_first_step_bound, sum_bound, weight_gradient_bound
from model.training import (DeviceNormalize, DistributedContext, WeightEma, build_training, launch, train,
                            train_step)

STEP_PROFILE = get_profile("smoke", image_size=32, batch_size=32, dropout=0.0, warmup_epochs=0.0)


def _batch(n: int = 32, size: int = 32):
    generator = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (n, 1, size, size), generator=generator, dtype=torch.uint8)
    y = (torch.arange(n) % 3 != 0).float()
    return x, y


def _one_step(ctx: DistributedContext, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)  # identical initial weights in every process and in the reference
    dev = torch.device("cpu")
    net, model, _, criterion, optimizer, scheduler = build_training(STEP_PROFILE, dev, None, n_pos=21, n_neg=11,
                                                                    steps_per_epoch=10, ctx=ctx)
    for module in net.modules():  # fixed BatchNorm statistics (see the module docstring)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    norm = DeviceNormalize(PreprocessConfig(image_size=32), dev)
    train_step(model, norm(x), y, criterion, optimizer, scheduler, scaler, None, dev)
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    return net.state_dict(), grads


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _batch()
        # DistributedSampler's split of one global batch: process r takes items r, r + world, ...
        state, grads = _one_step(DistributedContext(rank, world, rank), x[rank::world], y[rank::world])
        if rank == 0:
            torch.save({"state": state, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.numerics
def test_one_ddp_step_on_2x16_equals_one_step_on_32(tmp_path):
    """DDP's contract, checked at each link with a bound derived from what it compares (tests/numerics.py):
    its gradient is the average of the two processes' batch-16 gradients (one rounding of a sum of two); that
    average is the batch-32 gradient up to the regrouping of each weight gradient's sum over the batch; and
    the weights after the step are AdamW's first step from that gradient."""
    import torch.multiprocessing as mp


    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=False)
    torch.set_num_threads(1)
    x, y = _batch()
    state, grads = _one_step(DistributedContext(), x, y)
    halves = [_one_step(DistributedContext(), x[r::2], y[r::2])[1] for r in range(2)]  # each process's gradient
    regrouped = _batch_reduction_bound(x, y)
    for k, g in grads.items():
        averaged = (halves[0][k].double() + halves[1][k].double()) / 2
        ddp = distributed["grads"][k].double()
        pair = sum_bound((halves[0][k].double().abs() + halves[1][k].double().abs()) / 2, 2)
        assert ((ddp - averaged).abs() <= pair).all(), f"{k}: DDP's gradient is not the processes' average"
        excess = float(((averaged - g.double()).abs() - regrouped[k]).max())
        assert excess <= 0, f"{k}: the average of 2 x 16 differs from the batch-32 gradient by {excess:.2e} more " \
                            "than the regrouped batch sum allows"
    initial = _one_step_initial()
    moved = max(float((state[k].float() - v.float()).abs().max()) for k, v in initial.items())
    # AdamW's first step moves a weight by lr * g / (|g| + eps): about lr wherever |g| >> eps
    assert moved >= STEP_PROFILE.lr / 2, "the step did not change the weights: the comparison would prove nothing"
    for k, g in grads.items():
        allowed = adamw_first_step_bound(STEP_PROFILE.lr, distributed["grads"][k], g, initial[k])
        difference = (distributed["state"][k].double() - state[k].double()).abs()
        assert (difference <= allowed).all(), \
            f"{k}: weights after one DDP step differ by {float(difference.max()):.2e}, more than its gradient explains"


def _batch_reduction_bound(x, y) -> dict:
    """Per weight: numerics.weight_gradient_bound of the batch-32 step's backward pass."""
    torch.manual_seed(0)
    dev = torch.device("cpu")
    net, model, _, criterion, _, _ = build_training(STEP_PROFILE, dev, None, n_pos=21, n_neg=11, steps_per_epoch=10)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    norm = DeviceNormalize(PreprocessConfig(image_size=32), dev)
    return weight_gradient_bound(net, lambda: criterion(model(norm(x)).reshape(-1), y).backward())


def _one_step_initial():
    torch.manual_seed(0)
    net, *_ = build_training(STEP_PROFILE, torch.device("cpu"), None, 21, 11, 10)
    return net.state_dict()


@pytest.mark.numerics
def test_weight_ema_matches_averaged_model_semantics():
    """The multi-tensor EMA computes what the former per-parameter AveragedModel did."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 1))
    decay = 0.9

    def avg(avg_p, current, n_averaged):
        d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
        return avg_p * d + current * (1.0 - d)

    reference = torch.optim.swa_utils.AveragedModel(net, avg_fn=avg, use_buffers=True)
    ema = WeightEma(net, decay)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    largest = {k: v.abs().double() for k, v in net.state_dict().items() if v.is_floating_point()}
    for _ in range(25):
        loss = net(torch.randn(8, 1, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.update_parameters(net)
        ema.update_parameters(net)
        for k, v in net.state_dict().items():
            if k in largest:
                largest[k] = torch.maximum(largest[k], v.abs().double())
    ours, theirs = ema.module.state_dict(), reference.module.state_dict()
    for key, value in theirs.items():
        if value.is_floating_point():
            # a lerp (a + w (b - a)) against a * d + b * (1 - d), both float32: at most 7 roundings of terms no
            # larger than the largest value M seen, per step; earlier errors shrink (times d < 1). 25 steps.
            bound = 25 * 7 * U32 * largest[key]
            assert ((ours[key].double() - value.double()).abs() <= bound).all(), key
    assert int(ema.n_averaged) == int(reference.n_averaged) == 25
    restored = WeightEma(net, decay)
    restored.load_state_dict(ema.state_dict())  # resume: the ramp continues where it was
    assert restored.steps == 25


def test_device_normalisation_is_the_shared_preprocessing():
    config = PreprocessConfig(image_size=16, mean=0.47, std=0.23)
    pixels = np.random.default_rng(1).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    on_device = DeviceNormalize(config, torch.device("cpu"))(torch.from_numpy(pixels)[:, None])
    assert np.array_equal(on_device.numpy(), normalize(pixels, config))


def _synthetic_cache(tmp: Path, per_class: int = 20) -> Path:
    """Noise images with a class-dependent brightness, several per patient: enough to train a few steps."""
    rng = np.random.default_rng(0)
    for cls, stem in (("NORMAL", "IM-{p:04d}-{i:04d}"), ("PNEUMONIA", "person{p}_bacteria_{i}")):
        folder = tmp / "data" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            value = 90 if cls == "NORMAL" else 150
            pixels = np.clip(rng.normal(value, 40, (64, 64)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            patient = i % max(4, per_class // 2) + (0 if cls == "NORMAL" else 500)
            (folder / f"{stem.format(p=patient, i=i)}.png").write_bytes(buf.getvalue())
    prepare(str(tmp / "data"), tmp / "cache", 32, SplitFractions(0.25, 0.0, 0), workers=1)
    return tmp / "cache"


@pytest.mark.integration
def test_torchrun_trains_on_rank_0_only_and_resumes_with_another_world_size(tmp_path):
    cache = _synthetic_cache(tmp_path)
    profile = get_profile("smoke", image_size=32, batch_size=8, epochs=1, num_workers=0)
    out = tmp_path / "run"
    result = launch(cache, out, profile, seed=3, nproc=2)
    assert result.checkpoint.is_file() and len(result.history) == 1
    saved = json.loads((out / "result.json").read_text())
    assert saved["world_size"] == 2
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["world_size"] == 2 and last["epoch"] == 0
    assert not any(k.startswith("module.") for k in last["net"]), "DDP's wrapper leaked into the checkpoint"
    # The same run continued by ONE process: it picks up at epoch 2 with the schedule where it was.
    resumed = train(cache, out, get_profile("smoke", image_size=32, batch_size=8, epochs=2, num_workers=0), seed=3)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    steps_after = torch.load(out / "last.pt", weights_only=False)["scheduler"]["last_epoch"]
    assert steps_after == 2 * last["scheduler"]["last_epoch"]


def test_batch_size_must_split_across_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr("model.training.distributed_context", lambda: DistributedContext(0, 3, 0))
    cache = _synthetic_cache(tmp_path, per_class=10)
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        train(cache, tmp_path / "x", get_profile("smoke", image_size=32, batch_size=8))


def test_profiles_say_what_they_buy_without_claiming_a_cpu_feature():
    for name in ("demo", "cpu", "gpu"):
        assert "AVX2" not in get_profile(name).description
    assert get_profile("gpu").batch_size == 256
    with pytest.raises(ValueError, match="field mask"):
        get_profile("cpu", field_mask="circle")


def test_bf16_autocast_trains_where_the_cpu_has_native_bf16(monkeypatch):
    """On a CPU with AMX/AVX512-BF16 the step runs under bf16 autocast (emulated here, so only a tiny batch);
    the weights stay fp32 and move."""
    from model.training import _device_setup

    monkeypatch.setattr("model.training.cpu_has_native_bf16", lambda: True)
    dev, amp_dtype = _device_setup("cpu")
    assert amp_dtype == torch.bfloat16
    torch.manual_seed(0)
    net, model, _, criterion, optimizer, scheduler = build_training(STEP_PROFILE, dev, None, 2, 2, 10)
    before = net.fc[1].weight.detach().clone()
    x, y = _batch(4)
    loss = train_step(model, DeviceNormalize(PreprocessConfig(image_size=32), dev)(x), y, criterion, optimizer,
                      scheduler, torch.amp.GradScaler("cuda", enabled=False), amp_dtype, dev)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert net.fc[1].weight.dtype == torch.float32 and not torch.equal(net.fc[1].weight, before)
