"""Scale-out drill: a burst from 1 to 3 serving replicas behind nginx while a load generator runs.

    python benchmarks/scale_out_drill.py [--clients 8] [--steady-seconds 30] [--after-seconds 30] [--out FILE]

What a cluster does when the autoscaler adds pods, on one machine: replica 0 (a ``LocalStack``: transformer +
predictor, default settings, engine auto) serves behind a real nginx (``rollout.local_canary.Nginx``, its
upstream pool least-connections); ``--clients`` closed-loop REST v2 clients send full-resolution X-rays through
nginx for the whole drill (a refused request is sent again after the Retry-After pause). After
``--steady-seconds`` two more replicas start at once; each joins the pool when it reports ready, as an
endpoint does, by a graceful nginx reload. The replicas share an engine-choice folder (what the registry tag
is in a cluster): replica 0 times the engines and records its choice, the burst's replicas reuse it.

Reported: p50/p99 and throughput in the steady state, during the burst (its start to the last replica ready,
plus 10 s, or half of ``--after-seconds`` if shorter) and after it; requests failed (anything but 200 and the
admission's 503: goal 0) and refused; each new replica's start to ready. On 2 shared cores a new replica adds
no capacity -- it competes for the same cores while it starts -- so the drill measures what a scale-out costs
the requests in flight.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import closed_loop, percentiles, v2_request  # noqa: E402
from serving_throughput import build_bundle, cpu_info, load_images, log, stack_arguments, write_report  # noqa: E402

FULL_RESOLUTION = ROOT.parent / "shared" / "data" / "chest_xray_full" / "train" / "PNEUMONIA"


def replica_pool():
    from rollout.local_canary import Nginx

    class ReplicaPool(Nginx):
        """The canary's nginx with one upstream pool of every ready replica (least connections)."""

        def render(self, sides: dict[str, tuple[int, int]], canary_percent: int | None) -> str:
            text = super().render({"stable": next(iter(sides.values()))}, None)
            rest = "".join(f" server 127.0.0.1:{r};" for r, _ in sides.values())
            grpc = "".join(f" server 127.0.0.1:{g};" for _, g in sides.values())
            first_rest, first_grpc = next(iter(sides.values()))
            return (text.replace(f"upstream stable {{ server 127.0.0.1:{first_rest}; keepalive 32; }}",
                                 f"upstream stable {{ least_conn;{rest} keepalive 32; }}")
                    .replace(f"upstream stable_grpc {{ server 127.0.0.1:{first_grpc}; keepalive 32; }}",
                             f"upstream stable_grpc {{ least_conn;{grpc} keepalive 32; }}"))

    return ReplicaPool


def window(results, start: float, stop: float) -> dict:
    inside = [r for r in results if start <= r.sent < stop]
    ok = [r.latency_s for r in inside if r.status == "200"]
    p50, p99 = percentiles(ok, 50, 99)
    span = max(stop - start, 1e-9)
    return {"seconds": round(stop - start, 1), "answered": len(ok), "img_per_s": round(len(ok) / span, 2),
            "p50_ms": p50, "p99_ms": p99, "refused_503": sum(r.status == "503" for r in inside),
            "failed": sum(r.status not in ("200", "503") for r in inside),
            "failed_statuses": dict(Counter(r.status for r in inside if r.status not in ("200", "503")))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=3, help="replicas after the burst")
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--after-seconds", type=float, default=30.0)
    stack_arguments(parser, port=23600)
    args = parser.parse_args()

    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack, port_free

    encoded_224, _ = load_images(args.images)
    bundle_dir = build_bundle(Path(args.bundle), encoded_224)
    full = sorted(FULL_RESOLUTION.iterdir())[:args.images] if FULL_RESOLUTION.is_dir() else []
    requests = [v2_request(f.read_bytes()) for f in full] or [v2_request(b) for b in encoded_224]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "clients": args.clients,
              "replicas": args.replicas, "images": "full resolution" if full else "224 px"}
    with tempfile.TemporaryDirectory(prefix="pneumoscope-drill-") as tmp:
        settings = ServingSettings(model_sha256=Bundle.load(bundle_dir, verify=False).sha256,
                                   engine_choice_dir=str(Path(tmp) / "engine-choice"))
        ports = [p for p in range(args.port + 10, args.port + 400, 2) if port_free(p) and port_free(p + 1)]
        stacks: list = []
        pool = replica_pool()(Path(tmp) / "nginx", args.port)
        ready: dict[str, tuple[int, int]] = {}
        lock = threading.Lock()
        starts: dict[int, float] = {}

        def start_replica(k: int) -> None:
            stack = LocalStack(str(bundle_dir), ports[k], settings, log_file=log_dir / f"drill-replica-{k}.log",
                               restart=False)
            stacks.append(stack)
            began = time.perf_counter()
            info = stack.start(timeout=600, supervise_in_background=False)
            starts[k] = round(time.perf_counter() - began, 2)
            with lock:  # the endpoint joins the pool once ready
                ready[f"r{k}"] = (int(info["rest"].rpartition(":")[2]), int(info["grpc"].rpartition(":")[2]))
                pool.configure(dict(ready), None)
            log(f"replica {k} ready after {starts[k]} s; the pool has {len(ready)}")

        results: list = []
        stop_load = threading.Event()
        try:
            start_replica(0)
            url = f"http://127.0.0.1:{args.port}/v2/models/pneumonia/infer"
            closed_loop(url, requests, args.clients, 5)  # warm: connections, the admission's estimate
            t0 = time.perf_counter()
            generator = threading.Thread(target=lambda: results.extend(closed_loop(
                url, requests, args.clients, 3600, retry_pause_s=1.0, stop=stop_load)), daemon=True)
            generator.start()
            time.sleep(args.steady_seconds)
            burst_start = time.perf_counter() - t0
            starters = [threading.Thread(target=start_replica, args=(k,)) for k in range(1, args.replicas)]
            for t in starters:
                t.start()
            for t in starters:
                t.join()
            burst_end = time.perf_counter() - t0
            time.sleep(args.after_seconds)
            end = time.perf_counter() - t0
            stop_load.set()
            generator.join(timeout=120)  # the clients finish what they sent
        finally:
            stop_load.set()
            for stack in stacks:
                stack.stop()
            pool.stop()
    snapshot = [r for r in results if r.sent < end]
    settle = min(10.0, args.after_seconds / 2)  # the new replicas' first requests belong to the burst
    report["steady"] = window(snapshot, 0, burst_start)
    report["burst"] = window(snapshot, burst_start, burst_end + settle)
    report["after"] = window(snapshot, burst_end + settle, end)
    report["replica_start_to_ready_s"] = starts
    report["failed_total"] = sum(w["failed"] for w in (report["steady"], report["burst"], report["after"]))
    report["goal_no_failed_request"] = report["failed_total"] == 0
    report["burst_p99_over_steady_p99"] = (round(report["burst"]["p99_ms"] / report["steady"]["p99_ms"], 2)
                                           if report["burst"]["p99_ms"] and report["steady"]["p99_ms"] else None)
    report["load_average_end"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
