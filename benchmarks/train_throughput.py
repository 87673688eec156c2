"""Training throughput of ResNet-50 (img/s): the training setting (bf16 autocast where the CPU has native
bf16, channels_last) vs plain fp32 NCHW, in one run.

    python benchmarks/train_throughput.py --image-size 224 --batch-size 32 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn

from model.network import build_resnet50


def measure(image_size: int, batch_size: int, steps: int, bf16: bool, channels_last: bool, device: str) -> float:
    torch.manual_seed(0)
    net = build_resnet50(for_training=False).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    x = torch.randn(batch_size, 1, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), device=device).float()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x).reshape(-1).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, kernels
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-fp32", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from model.training import cpu_has_native_bf16

    native_bf16 = args.device == "cuda" or cpu_has_native_bf16()
    fast = measure(args.image_size, args.batch_size, args.steps, native_bf16, True, args.device)
    result = {"image_size": args.image_size, "batch_size": args.batch_size, "device": args.device,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "native_bf16": native_bf16,
              "capability": torch.backends.cpu.get_cpu_capability(),
              ("bf16" if native_bf16 else "fp32") + "_channels_last_img_per_s": round(fast, 2)}
    if not args.skip_fp32:
        slow = measure(args.image_size, args.batch_size, args.steps, False, False, args.device)
        result.update(fp32_img_per_s=round(slow, 2), speedup=round(fast / slow, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
