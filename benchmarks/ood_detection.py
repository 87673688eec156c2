"""The out-of-distribution detector against issue 17's goals, measured through the served path.

    python -m benchmarks.ood_detection --model BUNDLE_OR_URI [--sha256 DIGEST] --cache CACHE --out ood.json
    python -m benchmarks.ood_detection --table ood.json       # the Markdown table for BENCHMARKS.md

``CACHE`` is the prepared cache the model was evaluated on (``data prepare``): its val, holdout and sanity
(the official 16-image val) splits, and the holdout films' source files for the perturbed copies. Every film
goes through what the predictor runs: stage 1 + stage 2 of ``model.preprocessing``, an engine of
``serving.engine``, and the bundle's detector (``model.ood``) on the graph's pooled features.

Measured (each share with its Wilson 95 % interval):

- the share of films flagged (``ood_score`` > 1) on val (by construction about 1 - quantile), the holdout
  patients (goal: at most 5 %), the sanity split, and ``external_nih_224`` (goal: at least 90 %), by view
  (PA/AP, labels.csv) and label there;
- the holdout films blurred, rotated, cropped and with changed contrast or gamma (they must stay in use);
- every engine x precision this machine offers (ONNX Runtime / OpenVINO, fp32 / int8 / bf16): the share
  flagged and how many verdicts flip against ONNX Runtime fp32, the reference the cut-off was fitted with;
- the detector's own cost per film (median wall time of the [1, 2048] x [2048, 2048] product) beside the
  engine's time per film.

``external_nih_224`` is read here and nowhere in fitting: nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from model.bundle import Bundle
from model.data import CachedData
from model.ood import OodDetector
from model.preprocessing import decode, load_resized, normalize, resize

#: Acquisition changes of a stage-1 film. ``rotate`` turns the image with black corners (a film turned on a scanner);
#: ``rotatecrop`` turns it and keeps the largest centred window without corners (a patient turned on the detector).
PERTURBATIONS = ("blur_sigma1.5", "blur_sigma3", "rotate_+5", "rotate_+10", "rotate_-10", "rotatecrop_+5",
                 "rotatecrop_+10", "crop_centre_80", "crop_corner_85", "gamma_0.6", "gamma_1.6", "contrast_0.6")
DEFAULT_EXTERNAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "external_nih_224"


def wilson(k: int, n: int, z: float = 1.96) -> list[float | None]:
    """Wilson score 95 % interval of a share k/n."""
    if n == 0:
        return [None, None]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def share(flags: np.ndarray) -> dict:
    k, n = int(np.sum(flags)), int(len(flags))
    return {"n": n, "flagged": k, "share": round(k / n, 4) if n else None, "ci95": wilson(k, n)}


def perturb(pixels: np.ndarray, name: str) -> np.ndarray:
    """One acquisition change of a stage-1 gray film (uint8 H x W), as it would arrive."""
    from PIL import Image, ImageFilter

    image = Image.fromarray(pixels)
    height, width = pixels.shape
    kind, _, value = name.partition("_")
    if kind == "blur":
        return np.asarray(image.filter(ImageFilter.GaussianBlur(float(value.removeprefix("sigma")))))
    if kind in ("rotate", "rotatecrop"):
        turned = np.asarray(image.rotate(float(value), resample=Image.Resampling.BILINEAR, fillcolor=0))
        if kind == "rotate":
            return turned
        angle = math.radians(abs(float(value)))
        keep = 1 / (math.cos(angle) + math.sin(angle))  # the centred window the turned corners never reach
        dy, dx = round(height * (1 - keep) / 2), round(width * (1 - keep) / 2)
        return turned[dy:height - dy, dx:width - dx]
    if name == "crop_centre_80":
        dx, dy = round(width * 0.1), round(height * 0.1)
        return pixels[dy:height - dy, dx:width - dx]
    if name == "crop_corner_85":
        return pixels[:round(height * 0.85), :round(width * 0.85)]
    x = pixels.astype(np.float64) / 255.0
    if kind == "gamma":
        return np.round(np.power(x, float(value)) * 255).astype(np.uint8)
    if kind == "contrast":
        return np.round(np.clip((x - x.mean()) * float(value) + x.mean(), 0, 1) * 255).astype(np.uint8)
    raise ValueError(f"unknown perturbation {name}")


def load_sets(bundle: Bundle, cache: CachedData, external: Path, perturbations: tuple[str, ...],
              limit: int | None) -> dict[str, dict]:
    """{set name: {"pixels": uint8 [N,S,S] at the model resolution, "labels": [N], "meta": [...]}}."""
    config = bundle.preprocess
    sets = {}
    for split in ("val", "holdout", "sanity"):
        idx, labels = cache.split(split)
        idx, labels = idx[:limit], labels[:limit]
        pixels = np.asarray(cache.images[idx])
        if pixels.shape[1:] != (config.image_size, config.image_size):
            pixels = np.stack([resize(p, config) for p in pixels])
        sets[split] = {"pixels": pixels, "labels": labels}
    source = Path(cache.summary["source"])
    rows = [r for r in cache.manifest if r["split"] == "holdout"][:limit]
    if perturbations and source.is_dir():
        decoded = [decode((source / r["file"]).read_bytes()).pixels for r in rows]
        for name in perturbations:
            sets[f"holdout+{name}"] = {"pixels": np.stack([resize(perturb(p, name), config) for p in decoded]),
                                       "labels": np.array([r["label"] for r in rows])}
    labels_csv = external / "labels.csv"
    if labels_csv.is_file():
        with labels_csv.open() as fh:
            entries = list(csv.DictReader(fh))[:limit]
        sets["external_nih_224"] = {
            "pixels": np.stack([load_resized((external / e["file"]).read_bytes(), config).pixels for e in entries]),
            "labels": np.array([int(e["label"] == "PNEUMONIA") for e in entries]),
            "view": np.array([e["view"] for e in entries]), "age": np.array([float(e["age"]) for e in entries])}
    else:
        print(f"external set missing: {labels_csv} (see ../shared/data/README.md); skipped", flush=True)
    return sets


def run_engine(engine, pixels: np.ndarray, config, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    logits, features = [], []
    for start in range(0, len(pixels), batch):
        out = engine.run(np.ascontiguousarray(normalize(pixels[start:start + batch], config)))
        logits.append(out[0])
        features.append(out[2])
    return np.concatenate(logits), np.concatenate(features)


def candidates(bundle: Bundle, wanted: list[str] | None) -> list[tuple[str, str]]:
    from serving.engine import installed, native_bf16

    pairs = [("onnxruntime", "fp32")]
    if "model.int8.onnx" in bundle.meta["files"]:
        pairs.append(("onnxruntime", "int8"))
    if installed("openvino"):
        pairs += [("openvino", "fp32")] + ([("openvino", "int8")] if "model.int8.onnx" in bundle.meta["files"]
                                           else []) + ([("openvino", "bf16")] if native_bf16() else [])
    return [p for p in pairs if wanted is None or f"{p[0]}/{p[1]}" in wanted or p == ("onnxruntime", "fp32")]


def median_ms(call, repeats: int) -> float:
    """Median wall time of ``call()`` in milliseconds, after one untimed call."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def detector_cost(detector, features: np.ndarray, repeats: int = 200) -> dict:
    """Milliseconds of the detector per film, alone and in a batch of 8 (the predictor's default batch)."""
    out = {}
    for n in (1, 8):
        x = np.ascontiguousarray(np.resize(features, (n, features.shape[1])))
        out[f"batch_{n}_ms_per_film"] = round(median_ms(lambda: detector.scores(x), repeats) / n, 4)
    return out


def engine_cost(engine, pixels: np.ndarray, config, repeats: int = 20) -> float:
    """Milliseconds of the engine on one film."""
    x = np.ascontiguousarray(normalize(pixels[:1], config))
    return round(median_ms(lambda: engine.run(x), repeats), 3)


def measure(args) -> dict:
    from benchmarks.serving_throughput import cpu_info
    from model.intended_use import DecisionRule
    from model.registry import fetch_model
    from serving.engine import create_engine

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, info = fetch_model(args.model, tmp, args.mlflow_uri, expected_sha256=args.sha256)
        detector = OodDetector.load(bundle)
        if detector is None:
            raise SystemExit("this bundle carries no out-of-distribution detector (exported before it existed)")
        rule = DecisionRule.from_meta(bundle.meta)
        cache = CachedData.load(args.cache)
        perturbations = () if args.no_perturbations else PERTURBATIONS
        sets = load_sets(bundle, cache, Path(args.external), perturbations, args.limit)
        print("sets: " + ", ".join(f"{k} ({len(v['labels'])})" for k, v in sets.items()), flush=True)
        config = bundle.preprocess
        report = {"model": info, "bundle_sha256": bundle.sha256, "machine": cpu_info(),
                  "load_average_start": [round(v, 2) for v in load_start],
                  "intended_use": {k: v for k, v in bundle.intended_use.items() if k != "ood"},
                  "detector": bundle.intended_use["ood"], "sets": {}, "precisions": {}}
        reference: dict[str, np.ndarray] = {}
        for engine_name, precision in candidates(bundle, args.engines):
            key = f"{engine_name}/{precision}"
            graph = bundle.root / ("model.int8.onnx" if precision == "int8" else "model.onnx")
            engine = create_engine(engine_name, graph, precision, args.threads)
            started = time.perf_counter()
            by_set = {}
            for name, data in sets.items():
                if key != "onnxruntime/fp32" and name.startswith("holdout+"):
                    continue  # the perturbed copies are measured once, at the reference precision
                logits, features = run_engine(engine, data["pixels"], config)
                scores = detector.scores(features)
                if key == "onnxruntime/fp32":
                    reference[name] = scores
                    report["sets"][name] = summarise(name, data, scores, bundle.probability(logits), rule)
                flips = int(np.sum((scores > 1) != (reference[name] > 1)))
                by_set[name] = {"flagged_share": round(float(np.mean(scores > 1)), 4), "flips": flips,
                                "max_abs_score_diff": round(float(np.max(np.abs(scores - reference[name]))), 5)}
            report["precisions"][key] = {"sets": by_set, "engine_ms_per_film_batch_1": engine_cost(
                engine, sets["holdout"]["pixels"], config), "seconds": round(time.perf_counter() - started, 1)}
            print(f"{key}: " + ", ".join(f"{k} {v['flagged_share']:.3f} ({v['flips']} flips)"
                                         for k, v in by_set.items()), flush=True)
            if key == "onnxruntime/fp32":
                _, features = run_engine(engine, sets["holdout"]["pixels"][:8], config)
                report["detector_cost"] = detector_cost(detector, features)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def summarise(name: str, data: dict, scores: np.ndarray, probs: np.ndarray, rule) -> dict:
    """Share flagged, score quantiles and (with labels) the decisions of the images alone (no age given)."""
    flags = scores > 1.0
    out = {**share(flags), "score_quantiles": {q: round(float(np.quantile(scores, float(q))), 4)
                                                for q in ("0.05", "0.25", "0.5", "0.75", "0.95")}}
    decisions = [rule.decide(float(p), float(s), None).decision for p, s in zip(probs, scores)]
    out["decisions"] = {d: decisions.count(d) for d in ("PNEUMONIA", "NORMAL", "REFER")}
    labels = data["labels"]
    out["by_label"] = {label: share(flags[labels == value]) for value, label in ((0, "NORMAL"), (1, "PNEUMONIA"))
                       if np.any(labels == value)}
    if "view" in data:
        out["by_view"] = {view: share(flags[data["view"] == view]) for view in sorted(set(data["view"]))}
        out["by_view_and_label"] = {f"{view} {label}": share(flags[(data["view"] == view) & (labels == value)])
                                    for view in sorted(set(data["view"])) for value, label in ((0, "NORMAL"),
                                                                                             (1, "PNEUMONIA"))}
        ages = data["age"]
        out["age_rule"] = {"patients_over_limit": share(ages > rule.age_limit_years),
                           "referred_with_age_given": share(flags | (ages > rule.age_limit_years))}
    return out


def table(path: str) -> str:
    report = json.loads(Path(path).read_text())
    m = report["machine"]
    lines = [f"Model {report['model']['uri']} (profile {report['intended_use'].get('profile')}), cut-off "
             f"{report['detector']['cutoff']:.2f} ({report['detector']['rule']}); {m['model']}, load average "
             f"{report['load_average_start'][0]:.2f} at the start, {report['load_average_end'][0]:.2f} at the end.", "",
             "| films | n | flagged (ood_score > 1) | 95 % CI | median score |", "| --- | --- | --- | --- | --- |"]
    for name, s in report["sets"].items():
        lines.append(f"| {name} | {s['n']} | {s['share']:.3f} | {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f} | "
                     f"{s['score_quantiles']['0.5']:.2f} |")
        for group in ("by_view", "by_view_and_label"):
            for label, g in s.get(group, {}).items():
                if g["n"]:
                    lines.append(f"| {name}, {label} | {g['n']} | {g['share']:.3f} | {g['ci95'][0]:.3f}-"
                                 f"{g['ci95'][1]:.3f} | |")
    compared = [name for name in report["sets"] if not name.startswith("holdout+")]
    lines += ["", "| engine / precision | " + " | ".join(compared) + " | engine ms/film (batch 1) |",
              "| --- |" + " --- |" * (len(compared) + 1)]
    for key, p in report["precisions"].items():
        cells = [p["sets"][name] for name in compared]
        lines.append(f"| {key} | " + " | ".join(f"{v['flagged_share']:.3f} ({v['flips']} flips, max Δ "
                                                 f"{v['max_abs_score_diff']:.3f})" for v in cells)
                     + f" | {p['engine_ms_per_film_batch_1']:.1f} |")
    cost = report.get("detector_cost", {})
    lines += ["", f"Detector cost per film: {cost.get('batch_1_ms_per_film')} ms alone, "
                  f"{cost.get('batch_8_ms_per_film')} ms in a batch of 8."]
    nih = report["sets"].get("external_nih_224", {}).get("age_rule")
    if nih:
        lines.append(f"With the age from labels.csv passed as `patient_age`: {nih['patients_over_limit']['share']:.3f} "
                     f"of the NIH films are over the age limit; image and age together refer "
                     f"{nih['referred_with_age_given']['share']:.3f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="models:/NAME/VERSION or a bundle folder (with --sha256)")
    parser.add_argument("--sha256", help="expected bundle digest of a folder")
    parser.add_argument("--mlflow-uri")
    parser.add_argument("--cache", help="the prepared cache the model was evaluated on")
    parser.add_argument("--external", default=str(DEFAULT_EXTERNAL), help="external_nih_224 (validation only)")
    parser.add_argument("--engines", nargs="*", help="engine/precision pairs besides onnxruntime/fp32 (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, help="at most this many films per set (a smoke run)")
    parser.add_argument("--no-perturbations", action="store_true")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown table of a report and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not (args.model and args.cache):
        parser.error("--model and --cache are required")
    report = measure(args)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        print(table(args.out))
    else:
        print(text)


if __name__ == "__main__":
    main()
