"""Generalisation candidates under one protocol: patient-grouped K-fold CV of each recipe, then a table.

    python benchmarks/generalisation_cv.py --cache runs/cv/cache64 --out runs/cv --folds 3 --epochs 3
    python benchmarks/generalisation_cv.py --out runs/cv --table      # the Markdown table for BENCHMARKS.md

Each candidate is `pneumoscope train --folds K` with one option changed; the "refer band" row is the
baseline's out-of-fold predictions with the abstention band (no extra training). Runs that finished are kept
(``OUT/<candidate>/cv.json``), so the script can be stopped and started again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CANDIDATES = {
    "baseline": [],
    "border_erasing": ["--erase-borders", "0.5"],
    "field_mask_ellipse": ["--field-mask", "ellipse"],
}


def run(args) -> None:
    for name in args.candidates:
        out = Path(args.out) / name
        if (out / "cv.json").exists():
            print(f"{name}: done already ({out / 'cv.json'})", flush=True)
            continue
        cmd = [sys.executable, "-m", "model.cli", "train", "--cache", args.cache, "--out", str(out),
               "--profile", args.profile, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--folds", str(args.folds), "--seed", str(args.seed),
               *CANDIDATES[name]]
        started = time.time()
        print(f"{name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        print(f"{name}: {time.time() - started:.0f} s", flush=True)


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def table(out_dir: str) -> str:
    lines = ["| candidate | k-fold AUC | sensitivity | specificity | ECE | coverage | sanity AUC | sanity sens / spec "
             "| sanity ECE |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in CANDIDATES:
        path = Path(out_dir) / name / "cv.json"
        if not path.exists():
            continue
        cv = json.loads(path.read_text())
        m, s = cv["mean_sd"], cv["sanity"]
        lines.append(f"| {name} | {_cell(m['auc'])} | {_cell(m['sensitivity'])} | {_cell(m['specificity'])} | "
                     f"{_cell(m['ece'])} | 1 | {s['auc']:.3f} | {s['sensitivity']:.3f} / {s['specificity']:.3f} | "
                     f"{s['ece']:.3f} |")
        if name == "baseline":
            a, sa = cv["abstention"], s["abstention"]
            lines.append(f"| baseline + refer band (target {a['target']}) | (same model) | {a['sensitivity_mean']:.3f} "
                         f"(decided) | {a['specificity_mean']:.3f} (decided) | | {a['coverage_mean']:.3f} | | "
                         f"{sa['sensitivity']:.3f} / {sa['specificity']:.3f} (decided; coverage "
                         f"{sa['coverage']:.3f}) | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="prepared cache (pneumoscope data prepare --image-size N)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the finished runs")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if not args.cache:
        parser.error("--cache is required to run the candidates")
    run(args)
    print(table(args.out))


if __name__ == "__main__":
    main()
