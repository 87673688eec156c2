"""Admission by expected waiting time (issue 19): its three goals in one run, with the default settings.

    python benchmarks/admission.py [--seconds 60] [--clients 16] [--factor 4] [--refusals 1000] [--out FILE]

Two ``LocalStack`` runs on the 224 px benchmark bundle (engine auto, real X-rays over REST v2: the 224 px copies,
as the earlier overload benchmark, or with ``--full-resolution`` the originals):

1. reference: a budget no request reaches (``latency_budget_ms`` = 10 min, so everything up to ``max_inflight``
   is admitted, what ``PNEUMOSCOPE_MAX_INFLIGHT=16`` did before): the saturation throughput of ``--clients``
   closed-loop clients;
2. the shipped defaults:
   - unloaded: one client, closed loop: p50/p99;
   - ``--clients`` closed-loop clients that honour Retry-After (pause 1 s after a 503): throughput (goal >= 0.9 x
     the saturation) and accepted p99 (goal: within the budget the transformer reports,
     ``pneumoscope_latency_budget_seconds``);
   - ``--factor`` x the saturation rate, open loop, for ``--seconds``: accepted p99 (goal <= 2 x the unloaded
     p99), refused p99 (at once), anything else (goal: none);
   - refusal cost: the transformer held at its limit by requests that sent half their body (admitted, no CPU),
     then ``--refusals`` REST requests and as many gRPC ones, each refused: the transformer's
     CPU seconds (user + system) per refusal (goal <= 1 ms).

The load generator shares the CPUs with the servers. One JSON document (``--out``, and stdout).
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

from load import HeldRequest, closed_loop, open_loop, summarize, v2_request  # noqa: E402
from serving_throughput import build_bundle, cpu_info, load_images, log, stack_arguments, write_report  # noqa: E402

FULL_RESOLUTION = ROOT.parent / "shared" / "data" / "chest_xray_full" / "train" / "PNEUMONIA"


def metric(url: str, name: str) -> float | None:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def start(bundle_dir: Path, args, tag: str, **settings):
    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    settings = ServingSettings(model_sha256=Bundle.load(bundle_dir, verify=False).sha256, **settings)
    log_file = Path(args.log_dir) / f"admission-{tag}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(str(bundle_dir), args.port, settings, log_file=log_file, restart=False)
    return stack, stack.start(timeout=600, supervise_in_background=False)


def ok_per_s(results, seconds: float) -> float:
    return sum(r.status == "200" for r in results) / seconds


def refusal_cost(info: dict, payloads, count: int) -> dict:
    """CPU of the transformer per refused request, REST and gRPC, while it is held at its limit."""
    import psutil
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    rest = info["rest"]
    limit = int(metric(rest, "pneumoscope_admission_limit") or 2)
    body, headers, raw = payloads[0]
    held = [HeldRequest(rest, "/v2/models/pneumonia/infer", body, headers) for _ in range(limit)]
    deadline = time.monotonic() + 30
    while metric(rest, "pneumoscope_inflight_requests") != limit and time.monotonic() < deadline:
        time.sleep(0.05)
    transformer = psutil.Process(info["pids"]["transformer"])
    out = {"limit_held": limit}
    try:
        import httpx

        with httpx.Client(timeout=30) as client:
            before, statuses = transformer.cpu_times(), {}
            for _ in range(count):
                status = client.post(f"{rest}/v2/models/pneumonia/infer", content=body, headers=headers).status_code
                statuses[status] = statuses.get(status, 0) + 1
            after = transformer.cpu_times()
        out["rest"] = {"statuses": statuses, "cpu_ms_per_refusal": round(
            1000 * ((after.user + after.system) - (before.user + before.system)) / count, 3)}
        grpc_client = tg.InferenceServerClient(info["grpc"])
        tensor = tg.InferInput("image", [1], "BYTES")
        import numpy as np

        tensor.set_data_from_numpy(np.array([raw], dtype=np.object_))
        before, codes = transformer.cpu_times(), {}
        for _ in range(count):
            try:
                grpc_client.infer("pneumonia", [tensor])
                code = "OK"
            except InferenceServerException as exc:
                code = str(exc.status())
            codes[code] = codes.get(code, 0) + 1
        after = transformer.cpu_times()
        out["grpc"] = {"statuses": codes, "cpu_ms_per_refusal": round(
            1000 * ((after.user + after.system) - (before.user + before.system)) / count, 3)}
    finally:
        out["held_answered"] = [h.finish()[0] for h in held]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="overload and closed-loop duration")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--unloaded-seconds", type=float, default=20.0)
    parser.add_argument("--refusals", type=int, default=1000)
    parser.add_argument("--full-resolution", action="store_true",
                        help="send the originals of chest_xray_full (up to 2 MB; the client's own cost grows with "
                             "them) instead of the 224 px copies")
    stack_arguments(parser, port=23400)
    args = parser.parse_args()

    encoded_224, _ = load_images(args.images)
    bundle_dir = build_bundle(Path(args.bundle), encoded_224)
    full = sorted(FULL_RESOLUTION.iterdir())[:args.images] if args.full_resolution else []
    encoded = [f.read_bytes() for f in full] or encoded_224
    payloads = [(*v2_request(b), b) for b in encoded]
    requests = [(body, headers) for body, headers, _ in payloads]
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "started": time.strftime("%H:%M:%S"),
              "images": "full resolution" if full else "224 px", "clients": args.clients, "factor": args.factor}

    stack, info = start(bundle_dir, args, "reference", latency_budget_ms=600_000)
    try:
        url = f"{info['rest']}/v2/models/pneumonia/infer"
        closed_loop(url, requests, args.clients, 5)
        saturation = ok_per_s(closed_loop(url, requests, args.clients, args.seconds), args.seconds)
        report["saturation_img_per_s"] = round(saturation, 2)
        log(f"reference (everything admitted): {saturation:.1f} img/s with {args.clients} clients")
    finally:
        stack.stop()

    stack, info = start(bundle_dir, args, "default")
    try:
        url = f"{info['rest']}/v2/models/pneumonia/infer"
        closed_loop(url, requests, 1, 5)
        unloaded = summarize(closed_loop(url, requests, 1, args.unloaded_seconds))
        report["unloaded"] = unloaded
        unloaded_p99 = unloaded["latency_ms_200"]["p99"]
        closed = closed_loop(url, requests, args.clients, args.seconds, retry_pause_s=1.0)
        budget_s = metric(info["rest"], "pneumoscope_latency_budget_seconds")
        closed_summary = summarize(closed)
        accepted_p99 = closed_summary["latency_ms_200"]["p99"]
        report["closed_loop"] = dict(closed_summary, img_per_s=round(ok_per_s(closed, args.seconds), 2),
                                     budget_ms=None if budget_s is None else round(budget_s * 1000, 1),
                                     limit=metric(info["rest"], "pneumoscope_admission_limit"),
                                     service_rate=metric(info["rest"], "pneumoscope_service_rate"))
        report["goal_closed_loop_0.9x_saturation"] = report["closed_loop"]["img_per_s"] >= 0.9 * saturation
        report["goal_closed_loop_p99_within_budget"] = budget_s is not None and accepted_p99 <= budget_s * 1000
        log(f"defaults, {args.clients} closed-loop clients: {report['closed_loop']['img_per_s']} img/s "
            f"({report['closed_loop']['img_per_s'] / saturation:.2f} x saturation), accepted p99 {accepted_p99} ms, "
            f"budget {report['closed_loop']['budget_ms']} ms, limit {report['closed_loop']['limit']}")
        overload = summarize(open_loop(url, requests, args.factor * saturation, args.seconds))
        over_p99 = overload.get("latency_ms_200", {}).get("p99")
        ratio = round(over_p99 / unloaded_p99, 2) if over_p99 else None
        report["overload"] = dict(overload, offered_per_s=round(args.factor * saturation, 1),
                                  accepted_p99_over_unloaded_p99=ratio)
        report["goal_overload_accepted_p99_within_2x_unloaded"] = bool(over_p99) and over_p99 <= 2 * unloaded_p99
        report["goal_overload_nothing_but_200_and_503"] = set(overload["statuses"]) <= {"200", "503"}
        log(f"defaults, {args.factor}x overload: {overload['statuses']}, accepted p99 {over_p99} ms = "
            f"{report['overload']['accepted_p99_over_unloaded_p99']} x unloaded p99 {unloaded_p99} ms")
        report["refusal_cost"] = refusal_cost(info, payloads, args.refusals)
        report["goal_refusal_cpu_at_most_1ms"] = all(
            report["refusal_cost"][p]["cpu_ms_per_refusal"] <= 1.0 for p in ("rest", "grpc"))
        log(f"refusal cost: {report['refusal_cost']}")
    finally:
        stack.stop()
    report["load_average_end"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
