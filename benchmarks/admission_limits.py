"""Throughput and latency of the stack at fixed admission limits: what each queue depth costs (issue 19).

    python benchmarks/admission_limits.py [--limits 2,3,4,6] [--seconds 20] [--clients 16] [--out FILE]

For each limit L, a fresh ``LocalStack`` (224 px benchmark bundle, engine auto) whose transformer admits exactly L
requests at once (``max_inflight`` = L and a latency budget no request reaches), then ``--clients`` closed-loop
REST v2 clients that pause 1 s after a 503 (what Retry-After asks) for ``--seconds``: answered images per second
and the answered requests' p50/p99 (client side). It shows the trade the default floor of the admission
(:meth:`serving.settings.ServingSettings.min_inflight`) makes: the depth that keeps the engine busy against the
latency it costs. The load generator shares the CPUs with the servers. One JSON document (``--out``, stdout).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from admission import metric, ok_per_s, start  # noqa: E402
from load import closed_loop, summarize, v2_request  # noqa: E402
from serving_throughput import build_bundle, cpu_info, load_images, log, stack_arguments, write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", default="2,3,4,6")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    stack_arguments(parser, port=23600)
    args = parser.parse_args()

    encoded, _ = load_images(args.images)
    bundle_dir = build_bundle(Path(args.bundle), encoded)
    requests = [v2_request(b) for b in encoded]
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "clients": args.clients,
              "seconds": args.seconds, "limits": {}}
    for limit in (int(v) for v in args.limits.split(",")):
        stack, info = start(bundle_dir, args, f"limit-{limit}", max_inflight=limit, latency_budget_ms=600_000)
        try:
            url = f"{info['rest']}/v2/models/pneumonia/infer"
            closed_loop(url, requests, args.clients, 3)  # warm-up
            results = closed_loop(url, requests, args.clients, args.seconds, retry_pause_s=1.0)
            point = dict(summarize(results), img_per_s=round(ok_per_s(results, args.seconds), 1),
                         admission_limit=metric(info["rest"], "pneumoscope_admission_limit"),
                         load_average=os.getloadavg()[0])
            report["limits"][str(limit)] = point
            log(f"{limit} admitted at once: {point['img_per_s']} img/s, answered p50/p99 "
                f"{point['latency_ms_200']['p50']}/{point['latency_ms_200']['p99']} ms")
        finally:
            stack.stop()
    report["load_average_end"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
