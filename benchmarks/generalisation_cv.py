"""Generalisation candidates under one protocol, then a table.

Two protocols:

- ``--protocol kfold`` (default; a GPU's budget): patient-grouped K-fold CV of each recipe
  (``pneumoscope train --folds K``)::

    python benchmarks/generalisation_cv.py --cache runs/cv/cache64 --out runs/cv --folds 3 --epochs 3
    python benchmarks/generalisation_cv.py --out runs/cv --table

- ``--protocol holdout`` (issue 17's CPU protocol): each candidate trained with several seeds at a profile on
  the cache's patient-grouped train split (early stopping on val), its calibration, threshold and refer band
  fitted on val, then scored with bootstrap CIs on the held-out patients, the 16-image sanity set and an
  external validation set (never trained, pretrained, calibrated or thresholded on), with the CAM lung share
  on the holdout and the external films::

    nice -n 15 python benchmarks/generalisation_cv.py --protocol holdout --out runs/protocol --profile cpu \
        --seeds 42 43 --data ../shared/data/chest_xray_224 --external ../shared/data/external_nih_224 \
        --lung-model runs/lung_model
    python benchmarks/generalisation_cv.py --protocol holdout --out runs/protocol --table

  Candidates run in the order given (the most informative first); each prepares the cache it needs once
  (``OUT/caches/<name>``), trains into ``OUT/<candidate>/seed<S>`` (resumed from ``last.pt``), evaluates into
  ``.../eval/report.json`` and records the CPU, the load average and the time in ``.../run.json``.

Runs that finished are kept, so the script can be stopped and started again.
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

#: The holdout protocol's candidates: (cache variant, extra ``train`` arguments). "ssl_simclr" pretrains first.
HOLDOUT_CANDIDATES = {
    "baseline": ("plain", []),
    "lung_crop": ("lung_box", []),
    "acquisition_aug": ("plain", ["--augment", "acquisition"]),
    "mask_text": ("mask_text", []),
    "ssl_simclr": ("plain", ["--pretrained", "{out}/pretrain/backbone.pt"]),
    "lung_crop_mask": ("lung_box_mask", []),
}
#: ``data prepare`` arguments of each cache variant.
CACHE_VARIANTS = {
    "plain": [],
    "mask_text": ["--mask-text"],
    "lung_box": ["--lung-crop", "box", "--lung-model", "{lung_model}"],
    "lung_box_mask": ["--lung-crop", "box+mask", "--lung-model", "{lung_model}"],
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


# -- the holdout protocol ---------------------------------------------------------------------------

def _machine() -> dict:
    import os
    import platform

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}


def _prepare_cache(args, variant: str) -> Path:
    cache = Path(args.out) / "caches" / variant
    if (cache / "summary.json").exists():
        return cache
    extra = [a.format(lung_model=args.lung_model) for a in CACHE_VARIANTS[variant]]
    if "{lung_model}" in " ".join(CACHE_VARIANTS[variant]) and not args.lung_model:
        raise SystemExit(f"cache {variant} needs --lung-model (pneumoscope lungs train --out DIR)")
    cmd = [sys.executable, "-m", "model.cli", "data", "prepare", "--data", args.data, "--out", str(cache),
           "--image-size", str(_image_size(args)), *extra]
    print(f"cache {variant}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return cache


def _image_size(args) -> int:
    from model.profiles import get_profile

    return args.image_size_override or get_profile(args.profile).image_size


def _pretrain(args, cache: Path) -> None:
    out = Path(args.out) / "pretrain"
    if (out / "backbone.pt").exists():
        return
    cmd = [sys.executable, "-m", "model.cli", "pretrain", "--cache", str(cache), "--out", str(out),
           "--image-size", str(args.pretrain_size), "--epochs", str(args.pretrain_epochs)]
    started, before = time.time(), _machine()
    print(f"pretrain: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    (out / "run.json").write_text(json.dumps({"command": cmd, "seconds": round(time.time() - started),
                                              "before": before, "after": _machine()}, indent=2))


def run_holdout(args) -> None:
    from model.evaluation import EvalSettings, evaluate_checkpoint

    for name in args.candidates:
        variant, train_args = HOLDOUT_CANDIDATES[name]
        cache = _prepare_cache(args, variant)
        if name == "ssl_simclr":
            _pretrain(args, cache)
        for seed in args.seeds:
            out = Path(args.out) / name / f"seed{seed}"
            if not (out / "result.json").exists():
                cmd = [sys.executable, "-m", "model.cli", "train", "--cache", str(cache), "--out", str(out),
                       "--profile", args.profile, "--seed", str(seed),
                       *[a.format(out=args.out) for a in train_args]]
                if args.epochs_override:
                    cmd += ["--epochs", str(args.epochs_override)]
                if args.image_size_override:
                    cmd += ["--image-size", str(args.image_size_override)]
                started, before = time.time(), _machine()
                print(f"{name} seed {seed}: {' '.join(cmd)}", flush=True)
                subprocess.run(cmd, check=True)
                (out / "run.json").write_text(json.dumps({"command": cmd, "seconds": round(time.time() - started),
                                                          "before": before, "after": _machine()}, indent=2))
            if not (out / "eval" / "report.json").exists():
                print(f"{name} seed {seed}: evaluating", flush=True)
                evaluate_checkpoint(out / "checkpoint.pt", cache, out / "eval",
                                    EvalSettings(int8=False, gate_images=0, n_bootstrap=args.bootstrap,
                                                 external_data=args.external or ""),
                                    lung_model=args.lung_model)


def _ci(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "–"
    value = m[key]
    low_high = (m.get("ci95") or {}).get(key)
    return f"{value:.3f} [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else f"{value:.3f}"


def _share(s: dict | None) -> str:
    if not s:
        return "–"
    a = s["all"]
    ci = a.get("ci95")
    return f"{a['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{a['mean']:.3f}"


def holdout_table(out_dir: str) -> str:
    lines = ["| candidate | seed | holdout AUC | holdout spec. @ val thr. | holdout ECE | sanity AUC / spec. | "
             "external AUC | external spec. @ val thr. | external ECE | external AP-vs-PA AUC | CAM lung share "
             "holdout | CAM lung share external | train time | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in HOLDOUT_CANDIDATES:
        for run in sorted((Path(out_dir) / name).glob("seed*/eval/report.json")):
            report = json.loads(run.read_text())
            seed_dir = run.parent.parent
            info = json.loads((seed_dir / "run.json").read_text()) if (seed_dir / "run.json").exists() else {}
            splits, ext = report["splits"], report.get("external")
            shares = report.get("cam_lung_share", {})
            sanity = splits.get("sanity", {})
            minutes = f"{info['seconds'] / 60:.0f} min" if info.get("seconds") else "–"
            loads = "–"
            if info:
                loads = f"{info['before']['load_average'][1]:.1f}-{info['after']['load_average'][1]:.1f}"
            lines.append(
                f"| {name} | {seed_dir.name[4:]} | {_ci(splits.get('holdout'), 'auc')} | "
                f"{_ci(splits.get('holdout'), 'specificity')} | {_ci(splits.get('holdout'), 'ece')} | "
                f"{sanity.get('auc', float('nan')):.3f} / {sanity.get('specificity', float('nan')):.3f} | "
                f"{_ci(ext, 'auc')} | {_ci(ext, 'specificity')} | {_ci(ext, 'ece')} | "
                f"{ext.get('view_auc_ap_vs_pa', float('nan')) if ext else float('nan'):.3f} | "
                f"{_share(shares.get('holdout'))} | {_share(shares.get('external'))} | {minutes} | {loads} |")
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
    parser.add_argument("--candidates", nargs="+",
                        help=f"kfold: {', '.join(CANDIDATES)}; holdout: {', '.join(HOLDOUT_CANDIDATES)} "
                             "(default: all, in that order)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the finished runs")
    parser.add_argument("--protocol", choices=["kfold", "holdout"], default="kfold")
    holdout = parser.add_argument_group("holdout protocol")
    holdout.add_argument("--data", default="../shared/data/chest_xray_224", help="Kaggle-layout training data")
    holdout.add_argument("--external", help="external VALIDATION set (labels.csv): scored, never fitted on")
    holdout.add_argument("--lung-model", help="lung segmentation folder (pneumoscope lungs train): lung crops, "
                                              "the CAM lung share (the elliptical prior without it)")
    holdout.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    holdout.add_argument("--bootstrap", type=int, default=1000)
    holdout.add_argument("--epochs-override", type=int, help="plumbing runs only: not evidence")
    holdout.add_argument("--image-size-override", type=int, help="plumbing runs only: not evidence")
    holdout.add_argument("--pretrain-size", type=int, default=96)
    holdout.add_argument("--pretrain-epochs", type=int, default=3)
    args = parser.parse_args()
    if args.protocol == "holdout":
        args.candidates = args.candidates or list(HOLDOUT_CANDIDATES)
        unknown = set(args.candidates) - set(HOLDOUT_CANDIDATES)
        if unknown:
            parser.error(f"unknown holdout candidate(s) {', '.join(sorted(unknown))}")
        if not args.table:
            run_holdout(args)
        print(holdout_table(args.out))
        return
    args.candidates = args.candidates or list(CANDIDATES)
    if set(args.candidates) - set(CANDIDATES):
        parser.error(f"unknown k-fold candidate(s) {', '.join(sorted(set(args.candidates) - set(CANDIDATES)))}")
    if args.table:
        print(table(args.out))
        return
    if not args.cache:
        parser.error("--cache is required to run the candidates")
    run(args)
    print(table(args.out))


if __name__ == "__main__":
    main()
