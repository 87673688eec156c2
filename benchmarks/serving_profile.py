"""Where the served stack's CPU goes: py-spy flame graphs of the transformer and the predictor under load.

    python benchmarks/serving_profile.py [--seconds 20] [--concurrency 16] [--protocols grpc,rest_v2]
                                         [--out-dir benchmarks/profiles] [--native]

A ``LocalStack`` with the default settings (224 px benchmark bundle, engine auto), clients in this process
(16 closed-loop threads, one JPEG per request), and ``py-spy record`` attached to both server processes for
the same ``--seconds``: one SVG flame graph per process and protocol (``--native`` adds the C/C++ frames of
the engines, decoders and encoders: slower to sample, but shows ONNX Runtime/OpenVINO, libjpeg, zlib), and
the collapsed stacks, from which a summary of the most sampled frames and of the serving stages (decode, X-ray
gate, quality flags, heatmap, wire format, engine, batcher, gRPC/HTTP) is printed as JSON. Needs py-spy (the
``dev`` extra) and the right to ptrace the servers (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import GrpcClient, RestV2Client, build_bundle, cpu_info, drive, load_images, log, \
    write_report  # noqa: E402

#: serving stages, by the frames that belong to them (first match wins, leaf to root)
STAGES = (("engine (ONNX Runtime / OpenVINO)", ("onnxruntime", "openvino", "engine.py:run", "_run (serving/predictor")),
          ("decode (stage 1)", ("model/preprocessing.py", "PIL/", "pydicom")),
          ("quality flags", ("model/quality.py",)),
          ("X-ray gate", ("serving/inputs.py",)),
          ("heatmap PNG", ("serving/heatmap.py",)),
          ("resize + normalise (stage 2)", ("normalize", "resize")),
          ("wire format + protobuf", ("wire_format", "infer_type.py", "protobuf", "grpc_predict_v2")),
          ("batcher", ("serving/batching.py",)),
          ("gRPC / HTTP servers", ("grpc", "uvicorn", "starlette", "fastapi", "h11", "httptools", "asyncio")))


def collapsed_summary(path: Path, top: int = 15) -> dict:
    """From py-spy's collapsed stacks: the most sampled leaf frames and the share of each serving stage."""
    leaves, stages, total = collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaves[frames[-1]] += n
        stage = next((name for frame in reversed(frames) for name, marks in STAGES
                      if any(m in frame for m in marks)), "other")
        stages[stage] += n
    share = {k: round(100 * v / max(1, total), 1) for k, v in stages.most_common()}
    return {"samples": total, "stage_percent": share,
            "top_frames_percent": [(k, round(100 * v / max(1, total), 1)) for k, v in leaves.most_common(top)]}


def record(pid: int, seconds: float, out: Path, native: bool, rate: int) -> subprocess.Popen:
    argv = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
            "--duration", str(int(seconds)), "--rate", str(rate), "--nonblocking"]
    if native:
        argv.append("--native")
    svg = subprocess.Popen(argv + ["--format", "flamegraph", "--output", str(out.with_suffix(".svg"))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw = subprocess.Popen(argv + ["--format", "raw", "--output", str(out.with_suffix(".txt"))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return svg, raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--protocols", default="grpc,rest_v2")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--bundle", default=str(ROOT / ".pneumoscope" / "bench" / "bundle224"))
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "profiles"))
    parser.add_argument("--port", type=int, default=26880)
    args = parser.parse_args()

    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    encoded, _ = load_images(args.images)
    bundle_dir = build_bundle(Path(args.bundle), encoded)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = ServingSettings(model_sha256=Bundle.load(bundle_dir, verify=False).sha256)  # the defaults
    stack = LocalStack(str(bundle_dir), args.port, settings, log_file=out_dir / "stack.log", restart=False)
    info = stack.start(timeout=600, supervise_in_background=False)
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "settings": "defaults",
              "concurrency": args.concurrency, "seconds": args.seconds, "native": args.native, "profiles": {}}
    try:
        clients = {"grpc": lambda: GrpcClient(info["grpc"]), "rest_v2": lambda: RestV2Client(info["rest"])}
        for protocol in [p for p in args.protocols.split(",") if p]:
            drive(clients[protocol], encoded, args.concurrency, 3)  # warm: batches, connections, the budget
            recorders = {role: record(pid, args.seconds, out_dir / f"{role}-{protocol}", args.native, args.rate)
                         for role, pid in info["pids"].items()}
            result: dict = {}
            load = threading.Thread(target=lambda: result.update(
                drive(clients[protocol], encoded, args.concurrency, args.seconds + 1)))
            load.start()
            load.join()
            for role, pair in recorders.items():
                for process in pair:
                    process.wait(timeout=120)
                summary = collapsed_summary(out_dir / f"{role}-{protocol}.txt")
                report["profiles"][f"{role}/{protocol}"] = dict(summary, svg=str(out_dir / f"{role}-{protocol}.svg"))
                log(f"{role} {protocol}: {summary['stage_percent']}")
            report[f"load_{protocol}"] = {k: result.get(k) for k in ("img_per_s", "p50_ms", "p99_ms", "errors")}
            time.sleep(1)
    finally:
        stack.stop()
    report["load_average_end"] = os.getloadavg()
    write_report(report, out_dir / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
