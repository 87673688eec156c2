"""Overload: 4x the saturation load for 60 s against the served stack, for each admission limit given.

    python benchmarks/overload.py [--limits 2,4,8] [--seconds 60] [--factor 4] [--out runs/overload.json]

For each ``max_inflight`` limit, on a fresh ``LocalStack`` (transformer + predictor, 224 px ResNet-50):

1. unloaded: one client, closed loop (``--unloaded-seconds``): the p50/p99 an answer takes alone;
2. saturation: ``limit`` clients, closed loop: the images per second the stack finishes (X);
3. overload: requests arrive at ``factor`` x X per second for ``--seconds`` (open loop, whatever the
   answers do). Reported: accepted (200) p50/p99 against the unloaded p99 (goal <= 2x), refused (503)
   p50/p99 (goal: at once), anything else (goal: none), and the RSS of both processes every second
   (goal: flat: last 10 s vs first 10 s).

The load generator shares the CPUs with the servers. Results: one JSON document (``--out``, stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import RssSampler, closed_loop, open_loop, summarize, v2_request  # noqa: E402
from serving_throughput import build_bundle, cpu_info, load_images, log, stack_arguments, write_report  # noqa: E402


def one_limit(bundle_dir: Path, payloads, limit: int, args, port: int) -> dict:
    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    # a fixed limit, as admission was before issue 19: a budget no request reaches leaves only the hard bound
    settings = ServingSettings(max_inflight=limit, latency_budget_ms=600_000, threads=args.threads,
                               model_sha256=Bundle.load(bundle_dir, verify=False).sha256)
    log_file = Path(args.log_dir) / f"overload-{limit}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(str(bundle_dir), port, settings, log_file=log_file, restart=False)
    info = stack.start(timeout=300, supervise_in_background=False)
    url = f"{info['rest']}/v2/models/pneumonia/infer"
    try:
        closed_loop(url, payloads, 1, 3)  # warm-up
        unloaded = summarize(closed_loop(url, payloads, 1, args.unloaded_seconds))
        log(f"limit {limit}: unloaded {unloaded['latency_ms_200']}")
        saturated_results = closed_loop(url, payloads, limit, args.saturation_seconds)
        ok = [r for r in saturated_results if r.status == "200"]
        saturation = len(ok) / args.saturation_seconds
        log(f"limit {limit}: saturation {saturation:.1f} img/s with {limit} clients")
        rate = args.factor * saturation
        with RssSampler(info["pids"]) as rss:
            results = open_loop(url, payloads, rate, args.seconds)
        overload = summarize(results)
        accepted_p99 = overload.get("latency_ms_200", {}).get("p99")
        unloaded_p99 = unloaded["latency_ms_200"]["p99"]
        first = [s for t, s in rss.samples if t <= 10]
        last = [s for t, s in rss.samples if t >= args.seconds - 10]
        rss_report = {role: {"first_10s_mib": round(max(s[role] or 0 for s in first), 1),
                             "last_10s_mib": round(max(s[role] or 0 for s in last), 1),
                             "max_mib": round(max(s[role] or 0 for _, s in rss.samples), 1)}
                      for role in info["pids"]}
        accepted_per_s = overload["statuses"].get("200", 0) / args.seconds
        point = {"limit": limit, "unloaded": unloaded, "saturation_img_per_s": round(saturation, 2),
                 "offered_per_s": round(rate, 1), "overload": overload,
                 "accepted_per_s": round(accepted_per_s, 2),
                 "accepted_p99_over_unloaded_p99": round(accepted_p99 / unloaded_p99, 2) if accepted_p99 else None,
                 "rss": rss_report, "log": str(log_file)}
        log(f"limit {limit}: {json.dumps(point['overload']['statuses'])}, accepted p99 "
            f"{accepted_p99} ms = {point['accepted_p99_over_unloaded_p99']}x unloaded p99 {unloaded_p99} ms")
        return point
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", default="2,4,8", help="max_inflight values to measure")
    parser.add_argument("--seconds", type=float, default=60.0, help="overload duration per limit")
    parser.add_argument("--factor", type=float, default=4.0, help="offered load / saturation throughput")
    parser.add_argument("--unloaded-seconds", type=float, default=20.0)
    parser.add_argument("--saturation-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None)
    stack_arguments(parser, port=23300, images=64)
    args = parser.parse_args()

    encoded, _ = load_images(args.images)
    bundle_dir = build_bundle(Path(args.bundle), encoded)
    payloads = [v2_request(b) for b in encoded]
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "started": time.strftime("%H:%M:%S"),
              "image_size": 224, "images": len(encoded), "factor": args.factor, "seconds": args.seconds,
              "points": []}
    for limit in (int(x) for x in args.limits.split(",")):
        report["points"].append(one_limit(bundle_dir, payloads, limit, args, args.port))
    report["load_average_end"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

