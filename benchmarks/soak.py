"""Soak: 16 concurrent clients for 10 minutes of full-resolution X-rays through transformer -> predictor.

    python benchmarks/soak.py [--clients 16] [--minutes 10] [--out runs/soak.json]

A ``LocalStack`` (224 px ResNet-50, the shipped defaults except ``max_inflight`` = the number of clients and a
latency budget no request reaches, so that every client is admitted and what is measured is stability, not
admission) receives
the 200 originals of ``../shared/data/chest_xray_full`` (399-2890 px wide, up to 2 MB), each client in a
closed loop over REST v2. Per minute: requests, errors (anything but 200), p50/p99 latency, and the
RSS of the transformer and the predictor (highest sample of the minute, sampled every 5 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import RssSampler, closed_loop, percentiles, v2_request  # noqa: E402
from serving_throughput import build_bundle, cpu_info, load_images, log, stack_arguments, write_report  # noqa: E402

FULL = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA") or ROOT.parent / "shared" / "data") / "chest_xray_full"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None)
    stack_arguments(parser, port=23310, images=None)
    args = parser.parse_args()

    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    files = sorted(FULL.glob("*/*/*"))
    if not files:
        sys.exit(f"full-resolution X-rays not found at {FULL}")
    payloads = [v2_request(f.read_bytes()) for f in files]
    bundle_dir = build_bundle(Path(args.bundle), load_images(64)[0])
    settings = ServingSettings(max_inflight=args.clients, latency_budget_ms=600_000, threads=args.threads,
                               model_sha256=Bundle.load(bundle_dir, verify=False).sha256)
    log_file = Path(args.log_dir) / "soak.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(str(bundle_dir), args.port, settings, log_file=log_file, restart=False)
    info = stack.start(timeout=300, supervise_in_background=False)
    url = f"{info['rest']}/v2/models/pneumonia/infer"
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "started": time.strftime("%H:%M:%S"),
              "clients": args.clients, "minutes": args.minutes, "images": len(files),
              "image_bytes_max": max(len(p[0]) for p in payloads), "pids": info["pids"]}
    seconds = args.minutes * 60

    def progress(result):
        minute = int(result.sent // 60)
        if minute > progress.minute:  # results arrive out of order: report each minute once
            progress.minute = minute
            log(f"minute {minute + 1} of {args.minutes:.0f}; load average {os.getloadavg()[0]:.1f}")
    progress.minute = -1

    try:
        closed_loop(url, payloads, 2, 10)  # warm-up
        with RssSampler(info["pids"], every_s=5.0) as rss:
            results = closed_loop(url, payloads, args.clients, seconds, on_result=progress)
        alive = {role: stack.children[role].process.poll() is None for role in info["pids"]}
    finally:
        stack.stop()
    minutes = []
    for m in range(int(round(args.minutes))):
        inside = [r for r in results if m * 60 <= r.sent < (m + 1) * 60]
        ok = [r.latency_s for r in inside if r.status == "200"]
        p50, p99 = percentiles(ok, 50, 99)
        samples = [s for t, s in rss.samples if m * 60 <= t < (m + 1) * 60]
        minutes.append({"minute": m + 1, "requests": len(inside), "errors": len(inside) - len(ok),
                        "error_statuses": sorted({r.status for r in inside if r.status != "200"}),
                        "img_per_s": round(len(ok) / 60, 2), "p50_ms": p50, "p99_ms": p99,
                        "rss_mib": {role: round(max((s[role] or 0) for s in samples), 1) if samples else None
                                    for role in info["pids"]}})
    report.update(minutes=minutes, total_requests=len(results),
                  total_errors=sum(m["errors"] for m in minutes), processes_alive_at_end=alive,
                  exit_codes=stack.exit_codes, load_average_end=os.getloadavg())
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
