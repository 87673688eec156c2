"""How much kfp.local adds on top of the pipeline steps' own work.

Runs, each in a FRESH Python process so that both pay their own start-up and imports:
- ``direct``: the four step functions (components.steps: prepare, train, evaluate, register, with the
  same KFP artifact bookkeeping) called one after the other in one process;
- ``kfp``: the same pipeline through kfp.local's SubprocessRunner (what `pneumoscope pipeline run
  --local` does after its input checks): one process per step, executor input/output files.
Both read the same data and register into their own fresh SQLite MLflow store. The pairs alternate
(direct, kfp, direct, kfp, ...); prints one JSON object.

On a shared machine the raw difference of wall times is dominated by how fast the CPU happened to
train that minute, so the overhead is also computed load-robustly: each run's "work" is what the steps
themselves report for their model calls (prepare, the training loop, evaluation: the artifacts'
``seconds`` metadata, measured the same way in both modes), and

    overhead = (kfp wall - kfp work) - (direct wall - direct work)

i.e. what kfp.local adds: a process per step (interpreter start, torch/mlflow imports again, teardown),
executor input/output files, pipeline compilation and local orchestration.

    python benchmarks/kfp_local_overhead.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"


def pipeline_arguments(args, mlflow_uri: str) -> dict:
    return {"data_uri": str(args.data), "mlflow_uri": mlflow_uri, "profile": args.profile,
            "image_size": args.image_size, "limit_per_class": args.limit_per_class, "n_bootstrap": args.n_bootstrap,
            "int8": args.int8}


def run_direct(arguments: dict, work: Path) -> dict:
    from kfp.dsl import HTML, ClassificationMetrics, Dataset, Metrics, Model

    from components import steps

    def artifact(cls, name):
        return cls(name=name, uri=str(work / name))

    seconds = {}
    started = time.perf_counter()
    dataset = artifact(Dataset, "dataset")
    steps.preprocess(data_uri=arguments["data_uri"], dataset=dataset, profile=arguments["profile"],
                     image_size=arguments["image_size"], limit_per_class=arguments["limit_per_class"])
    seconds["preprocess"] = time.perf_counter() - started
    checkpoint = artifact(Model, "checkpoint")
    steps.train(dataset=dataset, checkpoint=checkpoint, metrics=artifact(Metrics, "train_metrics"),
                profile=arguments["profile"])
    seconds["train"] = time.perf_counter() - started - sum(seconds.values())
    model = artifact(Model, "model")
    steps.evaluate(dataset=dataset, checkpoint=checkpoint, model=model, metrics=artifact(Metrics, "metrics"),
                   classification=artifact(ClassificationMetrics, "classification"), report=artifact(HTML, "report"),
                   n_bootstrap=arguments["n_bootstrap"], int8=arguments["int8"])
    seconds["evaluate"] = time.perf_counter() - started - sum(seconds.values())
    _, version, _ = steps.register(dataset=dataset, checkpoint=checkpoint, model=model,
                                   mlflow_uri=arguments["mlflow_uri"], n_bootstrap=arguments["n_bootstrap"],
                                   pipeline_run_id="direct")
    seconds["register"] = time.perf_counter() - started - sum(seconds.values())
    work = {"preprocess": dataset.metadata["seconds"], "train": checkpoint.metadata["seconds"],
            "evaluate": model.metadata["seconds"]}
    return {"version": version, "work_seconds": work, "step_call_seconds": {k: round(v, 2) for k, v in seconds.items()}}


def run_kfp(arguments: dict, work: Path) -> dict:
    from pipelines.cli import run_local

    outputs = run_local(arguments, work / "pipeline_root")
    root = next((work / "pipeline_root").iterdir())
    seconds = {}
    for step, output in (("preprocess", "dataset"), ("train", "checkpoint"), ("evaluate", "model")):
        executor_output = json.loads((root / step / "executor_output.json").read_text())
        seconds[step] = executor_output["artifacts"][output]["artifacts"][0]["metadata"]["seconds"]
    return {"version": outputs["version"], "work_seconds": seconds}


def child(mode: str, arguments: dict, work: Path) -> None:
    (work).mkdir(parents=True, exist_ok=True)
    result = (run_direct if mode == "direct" else run_kfp)(arguments, work)
    print("RESULT " + json.dumps(result), flush=True)


def measure(mode: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"kfp-overhead-{mode}-") as tmp:
        work = Path(tmp)
        arguments = pipeline_arguments(args, f"sqlite:///{work / 'mlflow.db'}")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--arguments", json.dumps(arguments),
                               "--work", str(work)], capture_output=True, text=True,
                              env={**os.environ, "PNEUMOSCOPE_HOME": str(work / "home")})
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return dict(result, wall_seconds=round(wall, 2),
                wall_minus_work_seconds=round(wall - sum(result["work_seconds"].values()), 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="Kaggle-layout folder (default: ../shared/data)")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--limit-per-class", type=int, default=40)
    parser.add_argument("--n-bootstrap", type=int, default=200)
    parser.add_argument("--int8", action="store_true", help="also quantise to int8 in evaluate")
    parser.add_argument("--repeat", type=int, default=2, help="(direct, kfp) pairs to run")
    parser.add_argument("--child", choices=["direct", "kfp"], help=argparse.SUPPRESS)
    parser.add_argument("--arguments", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.arguments), args.work)
    if not args.data.is_dir():
        sys.exit(f"data not found: {args.data} (the benchmark reads the real X-rays from ../shared/data)")

    load_before = os.getloadavg()
    pairs = [{"direct": measure("direct", args), "kfp": measure("kfp", args)} for _ in range(args.repeat)]
    differences = [p["kfp"]["wall_seconds"] - p["direct"]["wall_seconds"] for p in pairs]
    overheads = [p["kfp"]["wall_minus_work_seconds"] - p["direct"]["wall_minus_work_seconds"] for p in pairs]
    print(json.dumps({
        "what": "wall time of the smoke pipeline through kfp.local vs the same four step calls in one process",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("child", "arguments", "work")},
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": pairs,
        "direct_wall_seconds_median": statistics.median(p["direct"]["wall_seconds"] for p in pairs),
        "kfp_local_wall_seconds_median": statistics.median(p["kfp"]["wall_seconds"] for p in pairs),
        "wall_difference_seconds": [round(d, 2) for d in differences],
        "wall_difference_seconds_median": round(statistics.median(differences), 2),
        "kfp_local_overhead_seconds": [round(d, 2) for d in overheads],
        "kfp_local_overhead_seconds_median": round(statistics.median(overheads), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
