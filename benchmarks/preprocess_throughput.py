"""Preprocessing throughput on full-resolution JPEGs, per core: the shared decode path (DCT-domain
draft + resize, what `data prepare` runs; the transformer runs stage 1, the predictor stage 2) vs plain
PIL decode + resize, and vs drafting straight at the model size (preprocessing version 1), one run.

    python benchmarks/preprocess_throughput.py --data ../shared/data/chest_xray_full --size 224
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from model.preprocessing import PreprocessConfig, decode, load_resized, resize


def plain_pil(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("L")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def draft_at_model_size(data: bytes, size: int) -> np.ndarray:
    """Preprocessing version 1: the JPEG drafted for the model's size directly (no version-independent stage)."""
    img = Image.open(io.BytesIO(data))
    img.draft("L" if img.mode == "L" else "RGB", (size, size))
    return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


def rate(fn, blobs: list[bytes], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for blob in blobs:
            fn(blob)
    return repeats * len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/chest_xray_full"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = sorted(Path(args.data).rglob("*.jpeg"))
    if not files:
        sys.exit(f"no JPEG files under {args.data} (the shared data folder is missing)")
    blobs = [f.read_bytes() for f in files]  # read once: this measures decoding, not the disk
    config = PreprocessConfig(image_size=args.size)
    shared = rate(lambda b: load_resized(b, config), blobs, args.repeats)
    baseline = rate(lambda b: plain_pil(b, args.size), blobs, args.repeats)
    version1 = rate(lambda b: draft_at_model_size(b, args.size), blobs, args.repeats)
    stage1 = rate(lambda b: decode(b), blobs, args.repeats)
    decoded = [decode(b).pixels for b in blobs]
    stage2 = rate(lambda px: resize(px, config), decoded, args.repeats)
    print(json.dumps({"images": len(blobs), "size": args.size, "single_process": True,
                      "shared_path_img_per_s_per_core": round(shared, 1),
                      "plain_pil_img_per_s_per_core": round(baseline, 1), "ratio": round(shared / baseline, 2),
                      "draft_at_model_size_img_per_s_per_core": round(version1, 1),
                      "stage1_decode_img_per_s_per_core": round(stage1, 1),
                      "stage2_resize_img_per_s_per_core": round(stage2, 1)}))


if __name__ == "__main__":
    main()
