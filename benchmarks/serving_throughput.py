"""Serving throughput: the raw engine vs the served stack, in one run, on real X-rays at 224 px.

    python benchmarks/serving_throughput.py [--out results.json] [--seconds 15] [--precisions fp32,int8]

1. A 224 px bundle exported from an untrained ResNet-50 (fp32 + static int8 calibrated on real
   X-rays; throughput does not depend on the weights), cached under ``.pneumoscope/bench/``.
2. Raw engine: ONNX Runtime directly on preprocessed tensors (the predictor's session settings),
   batch 1 and batched, img/s and latency percentiles.
3. Served: ``LocalStack`` (transformer + predictor processes, as ``pneumoscope serve``), clients
   sending one encoded JPEG per request over REST v2 (binary extension) and gRPC v2 (tritonclient),
   at concurrency 1, 4 and 16; img/s, p50/p99, and the predictor's dynamic-batch sizes.
4. Raw engine again at the end: the machine may be shared, so drift is visible.

Results: one JSON document (``--out``, and stdout). The load generator shares the CPU with the
servers, as it would on a 2-core box; its cost is part of the measured served numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA") or ROOT.parent / "shared" / "data") / "chest_xray_224"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    return {"cpus": os.cpu_count(), "model": model, "avx2": "avx2" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags, "python": platform.python_version()}


def load_images(count: int) -> tuple[list[bytes], list[str]]:
    if not (DATA / "train").is_dir():
        sys.exit(f"real X-rays not found at {DATA}: the benchmark needs ../shared/data/chest_xray_224")
    files = sorted((DATA / "train" / "NORMAL").iterdir())[: count // 2] + \
        sorted((DATA / "train" / "PNEUMONIA").iterdir())[: count - count // 2]
    return [f.read_bytes() for f in files], [f.name for f in files]


def build_bundle(dest: Path, encoded: list[bytes]) -> Path:
    """Untrained ResNet-50 at 224 px -> fp32 + int8 ONNX bundle (cached)."""
    from model.bundle import Bundle, BundleError

    try:
        bundle = Bundle.load(dest)
        if bundle.preprocess.image_size == 224 and "model.int8.onnx" in bundle.meta["files"]:
            return dest
    except (BundleError, FileNotFoundError, KeyError):
        pass
    import torch

    from model.bundle import write_bundle
    from model.export import export_onnx, quantize_int8
    from model.network import build_resnet50
    from model.preprocessing import PreprocessConfig, load_resized

    log(f"building the 224 px benchmark bundle in {dest} (export + int8 calibration, about a minute)")
    dest.mkdir(parents=True, exist_ok=True)
    raw = PreprocessConfig(image_size=224)
    pixels = np.stack([load_resized(b, raw).pixels for b in encoded[:32]])
    per_image = pixels.reshape(len(pixels), -1).mean(axis=1)
    config = PreprocessConfig(image_size=224, mean=float(pixels.mean() / 255), std=float((pixels / 255.0).std()),
                              train_intensity_mean=float(per_image.mean()), train_intensity_std=float(per_image.std()))
    torch.manual_seed(0)
    net = build_resnet50(for_training=False).eval()
    export_onnx(net, 224, dest / "model.onnx")
    quantize_int8(dest / "model.onnx", dest / "model.int8.onnx", pixels, config)
    write_bundle(dest, {"model_name": "pneumonia", "arch": "resnet50 (untrained, benchmark only)",
                        "preprocess": config.to_dict(), "threshold": 0.5, "temperature": 1.0, "metrics": {},
                        "int8": {"accepted": True, "reason": "benchmark bundle: no accuracy gate"}})
    return dest


def stats(latencies_s: list[float], images: int, wall_s: float) -> dict:
    lat = np.asarray(latencies_s) * 1000.0
    return {"img_per_s": round(images / wall_s, 2), "requests": len(lat), "images": images,
            "seconds": round(wall_s, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p90_ms": round(float(np.percentile(lat, 90)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": round(float(lat.mean()), 1)}


# ---------------------------------------------------------------------------------------------------
# raw engine

def raw_engine(bundle_dir: Path, precision: str, tensors: np.ndarray, batch: int, seconds: float, threads: int,
               spinning: bool) -> dict:
    from model.bundle import Bundle
    from serving.engine import create_session

    session = create_session(Bundle.load(bundle_dir, verify=False).onnx_path(precision), threads, spinning)
    feeds = [tensors[i:i + batch] for i in range(0, len(tensors) - batch + 1, batch)]
    for x in feeds[:2]:
        session.run(None, {"image": x})
    latencies, images, i = [], 0, 0
    cpu0 = sum(os.times()[:2])
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
        x = feeds[i % len(feeds)]
        t = time.perf_counter()
        session.run(None, {"image": x})
        latencies.append(time.perf_counter() - t)
        images += len(x)
        i += 1
    wall = time.perf_counter() - started
    cpu_ms = 1000 * (sum(os.times()[:2]) - cpu0) / images
    return dict(stats(latencies, images, wall), batch=batch, cpu_ms_per_image=round(cpu_ms, 1))


def raw_parallel(bundle_dir: Path, precision: str, tensors: np.ndarray, streams: int, seconds: float) -> dict:
    """``streams`` single-threaded runs side by side (one shared session): the engine's best throughput."""
    from model.bundle import Bundle
    from serving.engine import create_session

    session = create_session(Bundle.load(bundle_dir, verify=False).onnx_path(precision), 1)
    session.run(None, {"image": tensors[:1]})
    latencies: list[list[float]] = [[] for _ in range(streams)]
    stop_at = time.perf_counter() + seconds

    def worker(k: int):
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            session.run(None, {"image": tensors[i % len(tensors)][None]})
            latencies[k].append(time.perf_counter() - t)
            i += streams

    cpu0 = sum(os.times()[:2])
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    flat = [x for lat in latencies for x in lat]
    return dict(stats(flat, len(flat), wall), streams=streams,
                cpu_ms_per_image=round(1000 * (sum(os.times()[:2]) - cpu0) / len(flat), 1))


# ---------------------------------------------------------------------------------------------------
# served

class RestV2Client:
    """REST v2 with the binary extension: the JPEG travels as raw bytes, the small answer as JSON."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.Client(timeout=120)
        self.url = f"{url}/v2/models/pneumonia/infer"

    def payload(self, data: bytes) -> tuple[bytes, dict]:
        raw = len(data).to_bytes(4, "little") + data
        head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return head + raw, {"content-type": "application/octet-stream",
                            "inference-header-content-length": str(len(head))}

    def __call__(self, prepared) -> float:
        body, headers = prepared
        response = self.client.post(self.url, content=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["outputs"][0]["data"][0]


class GrpcClient:
    """gRPC v2 through tritonclient: raw_input_contents in, raw_output_contents out."""

    def __init__(self, target: str):
        import tritonclient.grpc as tg

        self.tg = tg
        self.client = tg.InferenceServerClient(target)

    def payload(self, data: bytes):
        tensor = self.tg.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        return tensor

    def __call__(self, tensor) -> float:
        return float(self.client.infer("pneumonia", [tensor]).as_numpy("probability")[0])


def drive(make_client, encoded: list[bytes], concurrency: int, seconds: float, warmup: int = 2) -> dict:
    """``concurrency`` threads, each with its own connection, one image per request, closed loop."""
    clients = [make_client() for _ in range(concurrency)]
    prepared = [[c.payload(b) for b in encoded] for c in clients]
    for c, p in zip(clients, prepared):
        for item in p[:warmup]:
            c(item)
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    barrier = threading.Barrier(concurrency + 1)

    def worker(k: int):
        barrier.wait()
        i = k * 7
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                clients[k](prepared[k][i % len(encoded)])
            except Exception as exc:  # counted, not fatal: reported in the results
                errors.append(str(exc)[:200])
                continue
            latencies[k].append(time.perf_counter() - t)
            i += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    flat = [x for lat in latencies for x in lat]
    result = dict(stats(flat, len(flat), wall), concurrency=concurrency)
    if errors:
        result["errors"] = len(errors)
        result["first_error"] = errors[0]
    return result


def cpu_seconds(pids: dict) -> dict:
    """user+system CPU seconds of the server processes and of this (client) process."""
    out = {"client": sum(os.times()[:2])}
    try:
        import psutil  # present with the pinned dependencies (transitively); optional here
    except ImportError:
        return out
    for role, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
            out[role] = times.user + times.system
        except psutil.Error:
            out[role] = float("nan")
    return out


def batch_histogram(predictor_rest: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{predictor_rest}/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("pneumoscope_batch_size_count", "pneumoscope_batch_size_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("pneumoscope_batch_size_count", 0.0), values.get("pneumoscope_batch_size_sum", 0.0)


def served(bundle_dir: Path, encoded: list[bytes], tensors: np.ndarray, args, precision: str, port: int) -> dict:
    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    # Throughput, not admission, is measured here: room for every client (benchmarks/overload.py does admission).
    settings = ServingSettings(precision=precision, threads=args.threads, engine_streams=args.engine_streams,
                               max_batch_size=args.max_batch_size,
                               max_batch_delay_ms=args.max_batch_delay_ms, spinning=args.spinning,
                               predictor_protocol=args.predictor_protocol, max_inflight=64,
                               model_sha256=Bundle.load(bundle_dir, verify=False).sha256)
    log_file = Path(args.log_dir) / f"stack-{precision}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(str(bundle_dir), port, settings, log_file=log_file, restart=False)
    info = stack.start(timeout=300, supervise_in_background=False)
    results = {"settings": {k: v for k, v in settings.model_dump().items()
                            if k in ("precision", "threads", "engine_streams", "max_batch_size", "max_batch_delay_ms",
                                     "spinning",
                                     "predictor_protocol")}, "log": str(log_file)}
    try:
        for name, make in (("rest_v2", lambda: RestV2Client(info["rest"])), ("grpc", lambda: GrpcClient(info["grpc"]))):
            if name not in args.protocols:
                continue
            results[name] = {}
            for concurrency in args.concurrency:
                # The machine may be shared: time the bare engine right before each served point.
                paired = raw_engine(bundle_dir, precision, tensors, 1, args.seconds / 2, args.threads, args.spinning)
                calls0, rows0 = batch_histogram(info["predictor_rest"])
                cpu0 = cpu_seconds(info["pids"])
                point = drive(make, encoded, concurrency, args.seconds)
                cpu1 = cpu_seconds(info["pids"])
                calls1, rows1 = batch_histogram(info["predictor_rest"])
                point["mean_engine_batch"] = round((rows1 - rows0) / max(1.0, calls1 - calls0), 2)
                point["cpu_ms_per_image"] = {k: round(1000 * (cpu1[k] - cpu0[k]) / max(1, point["images"]), 1)
                                             for k in cpu0}
                point["paired_raw_b1"] = {k: paired[k] for k in ("img_per_s", "p50_ms", "p99_ms", "cpu_ms_per_image")}
                point["over_paired_raw_b1"] = round(point["img_per_s"] / paired["img_per_s"], 3)
                results[name][f"c{concurrency}"] = point
                log(f"served {precision} {name} c={concurrency}: {point['img_per_s']} img/s (bare engine just before: "
                    f"{paired['img_per_s']}), p50 {point['p50_ms']} ms, p99 {point['p99_ms']} ms, engine batch "
                    f"{point['mean_engine_batch']}, CPU ms/img {point['cpu_ms_per_image']}")
    finally:
        stack.stop()
    return results


# ---------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".pneumoscope" / "bench" / "serving_throughput.json"))
    parser.add_argument("--bundle", default=str(ROOT / ".pneumoscope" / "bench" / "bundle224"))
    parser.add_argument("--images", type=int, default=64, help="real X-rays cycled through")
    parser.add_argument("--seconds", type=float, default=12.0, help="per measured point")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--protocols", default="rest_v2,grpc")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--raw-batch", type=int, default=8, help="batched raw-engine point")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op threads")
    parser.add_argument("--spinning", action="store_true")
    parser.add_argument("--engine-streams", type=int, default=None, help="served: parallel narrow engine runs")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0)
    parser.add_argument("--predictor-protocol", default="grpc-v2", choices=["grpc-v2", "v2"])
    parser.add_argument("--port", type=int, default=18480)
    parser.add_argument("--log-dir", default=str(ROOT / ".pneumoscope" / "bench" / "logs"))
    args = parser.parse_args()
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.protocols = [p for p in args.protocols.split(",") if p]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    from model.preprocessing import load_resized, normalize

    encoded, names = load_images(args.images)
    bundle_dir = build_bundle(Path(args.bundle), encoded)
    from model.bundle import Bundle

    config = Bundle.load(bundle_dir, verify=False).preprocess
    tensors = normalize(np.stack([load_resized(b, config).pixels for b in encoded]), config)
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "images": len(encoded),
              "image_size": 224, "bundle": str(bundle_dir), "seconds_per_point": args.seconds,
              "raw": {}, "served": {}}

    def raw_pass(tag: str):
        for precision in args.precisions:
            for batch in (1, args.raw_batch):
                point = raw_engine(bundle_dir, precision, tensors, batch, args.seconds, args.threads, args.spinning)
                report["raw"].setdefault(precision, {})[f"{tag}_b{batch}"] = point
                log(f"raw {precision} batch {batch} ({tag}): {point['img_per_s']} img/s, p50 {point['p50_ms']} ms")
            streams = args.threads
            if streams > 1:
                point = raw_parallel(bundle_dir, precision, tensors, streams, args.seconds)
                report["raw"][precision][f"{tag}_p{streams}"] = point
                log(f"raw {precision} {streams} single-threaded streams ({tag}): {point['img_per_s']} img/s, "
                    f"p50 {point['p50_ms']} ms")

    raw_pass("before")
    for k, precision in enumerate(args.precisions):
        report["served"][precision] = served(bundle_dir, encoded, tensors, args, precision, args.port + 2 * k)
    raw_pass("after")
    report["load_average_end"] = os.getloadavg()
    report["summary"] = summarize(report, args)
    text = json.dumps(report, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


def summarize(report: dict, args) -> dict:
    """The goals, against the raw engine of the before/after passes AND against the paired raw points.

    Goals: served >= 80 img/s; served >= 0.85 x raw; p99 at one request in flight <= 1.25 x raw
    single-image latency + 10 ms (checked against the raw p50 -- strict -- and the raw p99).
    """
    out = {}
    for precision, raw in report["raw"].items():
        b1 = [raw[k] for k in raw if k.endswith("_b1")]
        bn = [raw[k] for k in raw if not k.endswith("_b1")]  # batched, and parallel single-threaded streams
        raw_best = max(p["img_per_s"] for p in b1 + bn)
        raw_b1_p50 = float(np.median([p["p50_ms"] for p in b1]))
        raw_b1_p99 = float(np.median([p["p99_ms"] for p in b1]))
        srv = report["served"].get(precision, {})
        for protocol in ("rest_v2", "grpc"):
            if protocol not in srv:
                continue
            points = srv[protocol]
            best = max(points.values(), key=lambda p: p["img_per_s"])
            paired = [p["over_paired_raw_b1"] for p in points.values()]
            entry = {"raw_best_img_per_s": raw_best, "served_best_img_per_s": best["img_per_s"],
                     "served_best_at": f"c{best['concurrency']}",
                     "served_over_raw_best": round(best["img_per_s"] / raw_best, 3),
                     "served_over_paired_raw_b1": {k: p["over_paired_raw_b1"] for k, p in points.items()},
                     "median_served_over_paired_raw_b1": round(float(np.median(paired)), 3),
                     "goal_80_img_per_s": best["img_per_s"] >= 80,
                     "goal_0.85x_raw": best["img_per_s"] >= 0.85 * raw_best or float(np.median(paired)) >= 0.85}
            one = points.get("c1")
            if one:
                pair = one["paired_raw_b1"]
                entry.update(raw_b1_p50_ms=round(raw_b1_p50, 1), raw_b1_p99_ms=round(raw_b1_p99, 1),
                             served_c1_p50_ms=one["p50_ms"], served_c1_p99_ms=one["p99_ms"],
                             p99_limit_vs_raw_p50_ms=round(1.25 * pair["p50_ms"] + 10, 1),
                             p99_limit_vs_raw_p99_ms=round(1.25 * pair["p99_ms"] + 10, 1),
                             goal_p99_vs_raw_p50=one["p99_ms"] <= 1.25 * pair["p50_ms"] + 10,
                             goal_p99_vs_raw_p99=one["p99_ms"] <= 1.25 * pair["p99_ms"] + 10)
            out[f"{precision}/{protocol}"] = entry
    return out


if __name__ == "__main__":
    sys.exit(main())
