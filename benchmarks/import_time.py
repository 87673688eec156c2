"""Import time of the serving image's entry points, with `python -X importtime`, for one image or several
(this branch's and a baseline's, e.g. main's, built with docker/build.sh under two tags).

    python benchmarks/import_time.py --image IMAGE[,BASELINE_IMAGE] [--repeat 5] [--out runs/import.json]

Each measurement is a fresh `docker run` of the image (read-only root, as the manifests run it: the bytecode
baked into the image is what a pod gets; an image compiles bytecode only for what its servers import at build
time, so the deferral is compared across images, not by importing kserve first in one). Reported per image
and entry point: the median total over the runs and, from the median run, the modules that cost most.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import write_report  # noqa: E402

DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
ENTRY_POINTS = {"predictor": "serving.predictor_main", "transformer": "serving.transformer_main"}


def parse(stderr: str) -> tuple[float, list[tuple[float, int, str]]]:
    """(total seconds, [(cumulative seconds, depth, module)]) from -X importtime output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line.split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((int(cumulative) / 1e6, depth, name.strip()))
    return sum(c for c, d, _ in rows if d == 0), rows


def measure(image: str, code: str) -> tuple[float, list]:
    result = subprocess.run([DOCKER, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", "python3",
                             image, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"python3 -c {code!r} failed in {image}: {result.stderr[-500:]}")
    return parse(result.stderr)


def top_modules(rows: list, count: int = 12, max_depth: int = 4) -> list[dict]:
    seen, out = set(), []
    for cumulative, depth, name in sorted(rows, key=lambda r: -r[0]):
        if depth <= max_depth and name not in seen:
            seen.add(name)
            out.append({"module": name, "ms": round(cumulative * 1000), "depth": depth})
        if len(out) == count:
            break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    report = {"load_average_start": os.getloadavg(), "started": time.strftime("%H:%M:%S"), "images": {}}
    for image in args.image.split(","):
        report["images"][image] = {}
        for role, module in ENTRY_POINTS.items():
            runs = [measure(image, f"import {module}") for _ in range(args.repeat)]
            totals = [total for total, _ in runs]
            median_run = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            report["images"][image][role] = {"median_s": round(statistics.median(totals), 3),
                                             "runs_s": [round(t, 3) for t in totals], "top": top_modules(median_run[1])}
            print(f"{image} {role:<12} median {statistics.median(totals):.2f} s", file=sys.stderr)
    report["load_average_end"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
