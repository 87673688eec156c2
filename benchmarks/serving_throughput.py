"""Serving throughput: every raw engine x precision vs the served stack, in one run, on real X-rays at 224 px.

    python benchmarks/serving_throughput.py [--out results.json] [--seconds 10] [--engines onnxruntime,openvino]
                                            [--precisions fp32,int8[,bf16]] [--served auto[,openvino/int8,...]]

1. A 224 px bundle exported from an untrained ResNet-50 (fp32 + static int8 calibrated on real
   X-rays, and the engine gate set; throughput does not depend on the weights), cached under
   ``.pneumoscope/bench/``.
2. Raw engines: every engine x precision (``serving.engine``, exactly what the predictor runs) directly on
   preprocessed tensors: batch 1 and batched with all threads, and single-threaded streams side by side;
   img/s and latency percentiles. bf16 only where the CPU has native bf16.
3. Served: ``LocalStack`` (transformer + predictor processes, as ``pneumoscope serve``, the default settings:
   admission as shipped) with the engine ``auto`` chose at load (and any engine/precision forced with
   ``--served``), clients sending one encoded JPEG per request over REST v2 (binary extension) and gRPC v2
   (each request serialised once, all in flight on one asyncio loop; ``--load-generator libraries`` sends
   them from one thread each through httpx and tritonclient instead), at concurrency 1, 4 and 16; img/s,
   p50/p99, the predictor's dynamic-batch sizes, and refusals (503 / RESOURCE_EXHAUSTED, retried after a pause as
   a client honouring Retry-After would).
   And the predictor alone: its gRPC port fed stage-1 pixels (decoded once, as the transformer sends them),
   16 in flight, against the raw engine's best point for the same engine x precision.
4. With ``--split-cores``: the cluster's layout on one machine, the predictor on half the CPUs and the transformer
   and this load generator on the other half (the transformer with cores of its own), at 16 in flight, against
   the raw engine on the predictor's CPUs, alternated ``--rounds`` times.
5. Raw engines again at the end: the machine may be shared, so drift is visible.

Results: one JSON document (``--out``, and stdout). The load generator shares the CPU with the
servers, as it would on a 2-core box; its cost is part of the measured served numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA") or ROOT.parent / "shared" / "data") / "chest_xray_224"
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                     "amx_int8", "amx_tile")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stack_arguments(parser, port: int, images: int | None = 32) -> None:
    """The options every benchmark of a local stack shares: its films (``images`` None: no such option), the
    benchmark bundle, the servers' logs, the first port and the report file."""
    if images is not None:
        parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--bundle", default=str(ROOT / ".pneumoscope" / "bench" / "bundle224"))
    parser.add_argument("--log-dir", default=str(ROOT / "runs" / "bench-logs"))
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--out")


def write_report(report: dict, out: str | Path | None, indent: int = 2) -> None:
    """Print the JSON report, and keep it at ``out`` when given (folders made)."""
    text = json.dumps(report, indent=indent)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def cpu_info() -> dict:
    from serving.engine import cpu_flags, installed, native_bf16

    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    info = {"cpus": os.cpu_count(), "model": model, "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
            "native_bf16": native_bf16(), "python": platform.python_version()}
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    if installed("openvino"):
        import openvino

        info["openvino"] = openvino.__version__
        info["openvino_cpu_capabilities"] = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return info


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
        if bundle.preprocess.image_size == 224 and "model.int8.onnx" in bundle.meta["files"] and \
                bundle.meta.get("engine_gate"):
            return dest
    except (BundleError, FileNotFoundError, KeyError):
        pass
    import torch

    from model.bundle import make_session, run_images, write_bundle
    from model.engine_gate import write_gate_set
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
    # The gate set: 64 other real X-rays with their true labels; the temperature puts the random network's
    # logits on a calibrated scale (as fitting would), which sets the gate's logit tolerance.
    gate_files = sorted((DATA / "train" / "NORMAL").iterdir())[200:232] + \
        sorted((DATA / "train" / "PNEUMONIA").iterdir())[200:232]
    gate_pixels = np.stack([load_resized(f.read_bytes(), config).pixels for f in gate_files])
    gate_labels = np.array([int(f.parent.name == "PNEUMONIA") for f in gate_files])
    session = make_session(dest / "model.onnx")
    temperature = float(np.std(run_images(session, gate_pixels, config)))
    engine_gate = write_gate_set(dest, gate_pixels, gate_labels, session, config, temperature)
    write_bundle(dest, {"model_name": "pneumonia", "arch": "resnet50 (untrained, benchmark only)",
                        "preprocess": config.to_dict(), "threshold": 0.5, "temperature": temperature, "metrics": {},
                        "int8": {"accepted": True, "reason": "benchmark bundle: int8 accepted without an export "
                                 "gate; the engine gate still judges it"}, "engine_gate": engine_gate})
    return dest


def stats(latencies_s: list[float], images: int, wall_s: float) -> dict:
    lat = np.asarray(latencies_s) * 1000.0
    return {"img_per_s": round(images / wall_s, 2), "requests": len(lat), "images": images,
            "seconds": round(wall_s, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p90_ms": round(float(np.percentile(lat, 90)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": round(float(lat.mean()), 1)}


# ---------------------------------------------------------------------------------------------------
# raw engine

GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "bf16": "model.onnx"}


def raw_engine(bundle_dir: Path, combo: str, tensors: np.ndarray, batch: int, seconds: float, threads: int,
               spinning: bool) -> dict:
    """``combo`` = ENGINE/PRECISION, all ``threads`` on one call of ``batch`` images at a time."""
    from serving.engine import create_engine

    engine, precision = combo.split("/")
    session = create_engine(engine, bundle_dir / GRAPHS[precision], precision, threads, 1, spinning)
    feeds = [tensors[i:i + batch] for i in range(0, len(tensors) - batch + 1, batch)]
    for x in feeds[:2]:
        session.run(x)
    latencies, images, i = [], 0, 0
    cpu0 = sum(os.times()[:2])
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
        x = feeds[i % len(feeds)]
        t = time.perf_counter()
        session.run(x)
        latencies.append(time.perf_counter() - t)
        images += len(x)
        i += 1
    wall = time.perf_counter() - started
    cpu_ms = 1000 * (sum(os.times()[:2]) - cpu0) / images
    return dict(stats(latencies, images, wall), batch=batch, cpu_ms_per_image=round(cpu_ms, 1))


def raw_parallel(bundle_dir: Path, combo: str, tensors: np.ndarray, streams: int, seconds: float) -> dict:
    """``streams`` single-threaded runs side by side (the predictor's narrow engine): its best throughput."""
    from serving.engine import create_engine

    engine, precision = combo.split("/")
    session = create_engine(engine, bundle_dir / GRAPHS[precision], precision, 1, streams)
    session.run(tensors[:1])
    latencies: list[list[float]] = [[] for _ in range(streams)]
    stop_at = time.perf_counter() + seconds

    def worker(k: int):
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            session.run(tensors[i % len(tensors)][None])
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
    """REST v2 with the binary extension through httpx: the JPEG travels as raw bytes, the small answer as JSON."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.Client(timeout=120)
        self.url = f"{url}/v2/models/pneumonia/infer"

    def payload(self, data: bytes) -> tuple[bytes, dict]:
        from model.wire_format import bytes_input, encode_request

        return encode_request([bytes_input("image", [data])])

    def __call__(self, prepared) -> float:
        body, headers = prepared
        response = self.client.post(self.url, content=body, headers=headers)
        if response.status_code == 503 and response.json().get("reason") == "overloaded":
            raise Refused(response.headers.get("retry-after"))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["outputs"][0]["data"][0]


class Refused(Exception):
    """Admission said no (503 overloaded / RESOURCE_EXHAUSTED): the client pauses and sends again."""


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
        from tritonclient.utils import InferenceServerException

        try:
            return float(self.client.infer("pneumonia", [tensor]).as_numpy("probability")[0])
        except InferenceServerException as exc:
            if "RESOURCE_EXHAUSTED" in str(exc.status()):
                raise Refused() from None
            raise


class PredictorGrpcClient(GrpcClient):
    """The predictor alone over gRPC: stage-1 pixels (decoded here once, as the transformer sends them)."""

    def payload(self, data: bytes):
        # not serving.protocol: it imports kserve, whose protobufs clash with tritonclient's in one process
        from model.preprocessing import PREPROCESSING_VERSION, decode

        image = decode(data).pixels
        pixels, sizes = image[None], np.array([image.shape], dtype=np.int32)
        tensors = [self.tg.InferInput("pixels", list(pixels.shape), "UINT8"),
                   self.tg.InferInput("sizes", list(sizes.shape), "INT32")]
        tensors[0].set_data_from_numpy(pixels)
        tensors[1].set_data_from_numpy(sizes)
        return tensors, {"preprocessing": PREPROCESSING_VERSION}

    def __call__(self, prepared) -> float:
        from tritonclient.utils import InferenceServerException

        tensors, parameters = prepared
        try:
            return float(self.client.infer("pneumonia", tensors, parameters=parameters).as_numpy("probability")[0])
        except InferenceServerException as exc:
            if "RESOURCE_EXHAUSTED" in str(exc.status()):
                raise Refused() from None
            raise


class AsyncGrpcLoad:
    """The stack's gRPC requests of :class:`GrpcClient`, each serialised once and sent as bytes on one asyncio
    channel shared by every in-flight request; of the answer only ``probability`` is read. The load generator
    shares the cores with the servers: 16 tritonclient threads cost about 0.8 ms of CPU per request there, this
    about 0.5 ms."""

    METHOD = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self, target: str):
        self.target = target
        self.call = None

    async def open(self) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.call = self.channel.unary_unary(self.METHOD)  # bytes in, bytes out

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _pb():
        from tritonclient.grpc import service_pb2  # the v2 protobufs, without kserve (they clash in one process)

        return service_pb2

    def request(self, tensors: list[tuple[str, str, list[int], bytes]], parameters: dict | None = None) -> bytes:
        request = self._pb().ModelInferRequest(model_name="pneumonia")
        for name, datatype, shape, raw in tensors:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
        for key, value in (parameters or {}).items():
            field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
            setattr(request.parameters[key], field, value)
        return request.SerializeToString()

    def payload(self, data: bytes) -> bytes:
        return self.request([("image", "BYTES", [1], len(data).to_bytes(4, "little") + data)])

    async def __call__(self, prepared: bytes) -> float:
        try:
            reply = self._pb().ModelInferResponse.FromString(await self.call(prepared, timeout=120))
        except self.grpc.aio.AioRpcError as exc:
            if exc.code() == self.grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Refused() from None
            raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
        index = [o.name for o in reply.outputs].index("probability")
        return float(np.frombuffer(reply.raw_output_contents[index], dtype=np.float32)[0])


class AsyncPredictorLoad(AsyncGrpcLoad):
    """The predictor alone, fed as :class:`PredictorGrpcClient` feeds it (stage-1 pixels decoded here once), the
    requests pre-serialised as in :class:`AsyncGrpcLoad`."""

    def payload(self, data: bytes) -> bytes:
        from model.preprocessing import PREPROCESSING_VERSION, decode

        image = decode(data).pixels
        sizes = np.array([image.shape], dtype=np.int32)
        return self.request([("pixels", "UINT8", [1, *image.shape], np.ascontiguousarray(image).tobytes()),
                             ("sizes", "INT32", list(sizes.shape), sizes.tobytes())],
                            {"preprocessing": PREPROCESSING_VERSION})


class AsyncRestLoad:
    """The REST requests of :class:`RestV2Client`, pre-encoded with their HTTP/1.1 header and sent on kept-alive
    connections (``load.RawConnections``, one per request in flight); the answer's JSON is parsed for
    ``probability``. httpx threads cost about 2 ms of CPU per request on the servers' cores."""

    def __init__(self, url: str):
        from load import RawConnections

        self.url = f"{url}/v2/models/pneumonia/infer"
        self.connections = RawConnections.for_url(url)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self.connections.close()

    def payload(self, data: bytes) -> bytes:
        from load import raw_requests

        return raw_requests(self.url, [RestV2Client.payload(self, data)])[0]

    async def __call__(self, prepared: bytes) -> float:
        status, content = await self.connections.fetch(prepared, 120)
        if status == "503" and json.loads(content).get("reason") == "overloaded":
            raise Refused()
        if status != "200":
            raise RuntimeError(f"HTTP {status}: {content[:200]!r}")
        return json.loads(content)["outputs"][0]["data"][0]


#: --load-generator: the REST stack's, the gRPC stack's and the predictor's client classes
LOAD_GENERATORS = {"asyncio": (AsyncRestLoad, AsyncGrpcLoad, AsyncPredictorLoad),
                   "libraries": (RestV2Client, GrpcClient, PredictorGrpcClient)}


def drive_async(make_client, encoded: list[bytes], concurrency: int, seconds: float, warmup: int = 2,
                retry_pause_s: float = 0.1) -> dict:
    """:func:`drive` with one asyncio client (an ``Async*Load``) and ``concurrency`` requests in flight on it."""
    import asyncio

    async def run() -> dict:
        client = make_client()
        await client.open()
        prepared = [client.payload(b) for b in encoded]
        latencies: list[float] = []
        errors: list[str] = []
        refused = [0]

        async def worker(k: int, stop_at: float, record: bool) -> None:
            i = k * 7
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await client(prepared[i % len(prepared)])
                except Refused:
                    refused[0] += record
                    await asyncio.sleep(retry_pause_s)
                    continue
                except Exception as exc:  # counted, not fatal: reported in the results
                    errors.append(str(exc)[:200])
                    continue
                if record:
                    latencies.append(time.perf_counter() - t)
                i += 1

        # warm-up: every in-flight slot sends ``warmup`` requests' worth of time (its connection is opened)
        await asyncio.gather(*(worker(k, time.perf_counter() + 0.05 * warmup, False) for k in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(k, started + seconds, True) for k in range(concurrency)))
        wall = time.perf_counter() - started
        await client.close()
        return closed_loop_result(latencies, wall, concurrency, refused[0], errors)

    return asyncio.run(run())


def drive(make_client, encoded: list[bytes], concurrency: int, seconds: float, warmup: int = 2,
          retry_pause_s: float = 0.1) -> dict:
    """``concurrency`` threads, each with its own connection, one image per request, closed loop; a refused
    request is sent again after ``retry_pause_s``."""
    clients = [make_client() for _ in range(concurrency)]
    prepared = [[c.payload(b) for b in encoded] for c in clients]
    for c, p in zip(clients, prepared):
        for item in p[:warmup]:
            try:
                c(item)
            except Refused:
                time.sleep(retry_pause_s)
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    refused = [0]
    stop_at = time.perf_counter() + seconds
    barrier = threading.Barrier(concurrency + 1)

    def worker(k: int):
        barrier.wait()
        i = k * 7
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                clients[k](prepared[k][i % len(encoded)])
            except Refused:
                refused[0] += 1
                time.sleep(retry_pause_s)
                continue
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
    return closed_loop_result([x for lat in latencies for x in lat], wall, concurrency, refused[0], errors)


def closed_loop_result(latencies: list[float], wall: float, concurrency: int, refused: int, errors: list[str]) -> dict:
    result = dict(stats(latencies, len(latencies), wall), concurrency=concurrency, refused=refused)
    if errors:
        result["errors"] = len(errors)
        result["first_error"] = errors[0]
    return result


def measured_point(args, make_client, encoded: list[bytes], concurrency: int, pids: dict,
                   roles: tuple[str, ...] | None = None, digits: int = 1) -> dict:
    """One closed-loop point driven by ``--load-generator``'s driver, with the CPU milliseconds per image of this
    process (``client``) and of the servers (``roles``: all of them by default)."""
    drive_points = drive_async if args.load_generator == "asyncio" else drive
    cpu0 = cpu_seconds(pids)
    point = drive_points(make_client, encoded, concurrency, args.seconds)
    cpu1 = cpu_seconds(pids)
    point["cpu_ms_per_image"] = {role: round(1000 * (cpu1[role] - cpu0[role]) / max(1, point["images"]), digits)
                                 for role in (roles or cpu0) if role in cpu0}
    return point


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


def engine_choice(predictor_rest: str) -> tuple[str, dict]:
    """The engine/precision the predictor serves with (v2 metadata) and what it measured at load (/metrics)."""
    import httpx

    platform = httpx.get(f"{predictor_rest}/v2/models/pneumonia").json()["platform"]
    engine, precision = platform.split("/")
    sample = re.compile(r'^pneumoscope_engine_candidate_images_per_second'
                        r'\{engine="([^"]+)",precision="([^"]+)"\} (\S+)$')
    measured = {f"{m[1]}/{m[2]}": float(m[3]) for m in map(sample.match, httpx.get(f"{predictor_rest}/metrics")
                                                           .text.splitlines()) if m}
    return f"{engine.removesuffix('_onnx')}/{precision}", measured


def served(bundle_dir: Path, encoded: list[bytes], tensors: np.ndarray, args, target: str, port: int) -> dict:
    """The stack with ``target``: ``auto`` (the predictor chooses) or ``ENGINE/PRECISION`` forced."""
    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    engine, precision = ("auto", "auto") if target == "auto" else target.split("/")
    settings = ServingSettings(engine=engine, precision=precision, threads=args.threads,
                               engine_streams=args.engine_streams, max_batch_size=args.max_batch_size,
                               max_batch_delay_ms=args.max_batch_delay_ms, spinning=args.spinning,
                               predictor_protocol=args.predictor_protocol,
                               # admission as shipped (the goal is for the default settings)
                               model_sha256=Bundle.load(bundle_dir, verify=False).sha256)
    log_file = Path(args.log_dir) / f"stack-{target.replace('/', '-')}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(str(bundle_dir), port, settings, log_file=log_file, restart=False)
    started = time.perf_counter()
    info = stack.start(timeout=600, supervise_in_background=False)
    chosen, measured = engine_choice(info["predictor_rest"])
    log(f"served {target}: the predictor serves {chosen} (ready after {time.perf_counter() - started:.0f} s; "
        f"measured at load, img/s: {measured or 'one candidate, not timed'})")
    results = {"settings": {k: v for k, v in settings.model_dump().items()
                            if k in ("engine", "precision", "threads", "engine_streams", "max_batch_size",
                                     "max_batch_delay_ms", "spinning", "predictor_protocol")},
               "chosen": chosen, "measured_at_load_img_per_s": measured,
               "start_to_ready_s": round(time.perf_counter() - started, 1), "log": str(log_file)}
    rest_client, grpc_client, predictor_client = LOAD_GENERATORS[args.load_generator]
    results["load_generator"] = args.load_generator
    try:
        if "predictor" in args.protocols:  # the predictor alone, fed stage-1 pixels over gRPC, 16 in flight
            # A virtual CPU's speed drifts by several per cent from one 10-s window to the next: the raw engine's
            # best point and the served point alternate --rounds times, and the verdict is the median ratio.
            rounds = []
            for k in range(args.rounds):
                best_raw = max(raw_best_points(bundle_dir, chosen, tensors, args), key=lambda p: p["img_per_s"])
                point = measured_point(args, lambda: predictor_client(info["predictor_grpc"]), encoded, 16,
                                       info["pids"], roles=("client", "predictor"), digits=2)
                point["raw_best_same_run"] = best_raw
                point["over_raw_best"] = round(point["img_per_s"] / best_raw["img_per_s"], 3)
                rounds.append(point)
                log(f"predictor alone ({chosen}) gRPC c=16, round {k + 1}/{args.rounds}: {point['img_per_s']} img/s = "
                    f"{point['over_raw_best']} x the raw engine's best just before ({best_raw['img_per_s']} img/s, "
                    f"{best_raw['mode']}); CPU ms/img {point['cpu_ms_per_image']}")
            median = sorted(rounds, key=lambda p: p["over_raw_best"])[len(rounds) // 2]
            results["predictor_alone_grpc_c16"] = dict(median, rounds=[
                {key: p[key] for key in ("img_per_s", "p50_ms", "p99_ms", "over_raw_best", "cpu_ms_per_image")}
                | {"raw_best_img_per_s": p["raw_best_same_run"]["img_per_s"]} for p in rounds])
        for name, make in (("rest_v2", lambda: rest_client(info["rest"])), ("grpc", lambda: grpc_client(info["grpc"]))):
            if name not in args.protocols:
                continue
            results[name] = {}
            for concurrency in args.concurrency:
                # The machine may be shared: time the bare engine right before each served point.
                paired = raw_engine(bundle_dir, chosen, tensors, 1, args.seconds / 2, args.threads, args.spinning)
                calls0, rows0 = batch_histogram(info["predictor_rest"])
                point = measured_point(args, make, encoded, concurrency, info["pids"])
                calls1, rows1 = batch_histogram(info["predictor_rest"])
                point["mean_engine_batch"] = round((rows1 - rows0) / max(1.0, calls1 - calls0), 2)
                point["paired_raw_b1"] = {k: paired[k] for k in ("img_per_s", "p50_ms", "p99_ms", "cpu_ms_per_image")}
                point["over_paired_raw_b1"] = round(point["img_per_s"] / paired["img_per_s"], 3)
                results[name][f"c{concurrency}"] = point
                log(f"served {target} ({chosen}) {name} c={concurrency}: {point['img_per_s']} img/s (bare engine just "
                    f"before: {paired['img_per_s']}), p50 {point['p50_ms']} ms, p99 {point['p99_ms']} ms, engine batch "
                    f"{point['mean_engine_batch']}, CPU ms/img {point['cpu_ms_per_image']}")
    finally:
        stack.stop()
    return results


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (affinity is per thread; new threads inherit their creator's)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile


@contextlib.contextmanager
def calling_thread_on(cpus: set[int]):
    """The calling thread on ``cpus`` for the block (the processes it starts inherit them), then back."""
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def raw_on(cpus: set[int], bundle_dir: Path, combo: str, tensors: np.ndarray, args) -> dict:
    """The raw engine's best point (batch 1 and batched, all of ``cpus``' threads) in a child process started on
    ``cpus``: this process's engine threads keep the affinity they were created with."""
    import multiprocessing

    with calling_thread_on(cpus), multiprocessing.get_context("spawn").Pool(1) as pool:
        points = [dict(pool.apply(raw_engine, (bundle_dir, combo, tensors, batch, args.seconds / 2, len(cpus),
                                                args.spinning)), mode=f"batch {batch}")
                  for batch in (1, args.max_batch_size)]
    return max(points, key=lambda p: p["img_per_s"])


def split_cores(bundle_dir: Path, encoded: list[bytes], tensors: np.ndarray, args, port: int) -> dict:
    """The cluster's layout on one machine: the predictor alone on the first half of the CPUs (its defaults follow
    its CPU set: one engine stream of as many threads), the transformer and this load generator on the other half,
    as when the transformer's pod has cores of its own. Against the raw engine on the predictor's CPUs, rounds
    alternated; the engine is the one ``auto`` chose for the whole machine."""
    from model.bundle import Bundle
    from serving.settings import ServingSettings
    from serving.stack import LocalStack

    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus, front_cpus = set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])
    settings = ServingSettings(engine="auto", precision="auto", predictor_protocol=args.predictor_protocol,
                               model_sha256=Bundle.load(bundle_dir, verify=False).sha256)
    log_file = Path(args.log_dir) / "stack-split-cores.log"
    stack = LocalStack(str(bundle_dir), port, settings, log_file=log_file, restart=False)
    with calling_thread_on(engine_cpus):  # both children start there (the predictor sizes its engine from it)
        info = stack.start(timeout=600, supervise_in_background=False)
    results = {"engine_cpus": sorted(engine_cpus), "front_cpus": sorted(front_cpus), "log": str(log_file)}
    rest_client, grpc_client, _ = LOAD_GENERATORS[args.load_generator]
    try:
        pin(info["pids"]["transformer"], front_cpus)
        chosen, _ = engine_choice(info["predictor_rest"])
        results["chosen"] = chosen
        # The load generator beside the transformer; raw_on starts its child on the engine's CPUs all the same.
        pin(os.getpid(), front_cpus)
        for k in range(args.rounds):
            raw = raw_on(engine_cpus, bundle_dir, chosen, tensors, args)
            for name, make in (("rest_v2", lambda: rest_client(info["rest"])),
                               ("grpc", lambda: grpc_client(info["grpc"]))):
                if name not in args.protocols:
                    continue
                point = measured_point(args, make, encoded, 16, info["pids"], digits=2)
                point["raw_same_cpus"] = {x: raw[x] for x in ("img_per_s", "p50_ms", "mode", "cpu_ms_per_image")}
                point["over_raw"] = round(point["img_per_s"] / raw["img_per_s"], 3)
                results.setdefault(name, []).append(point)
                log(f"split cores (engine on {sorted(engine_cpus)}, transformer and client on {sorted(front_cpus)}), "
                    f"{name} c=16, round {k + 1}/{args.rounds}: {point['img_per_s']} img/s = {point['over_raw']} x "
                    f"the raw engine on the same CPUs ({raw['img_per_s']} img/s, {raw['mode']}); CPU ms/img "
                    f"{point['cpu_ms_per_image']}")
    finally:
        pin(os.getpid(), set(cpus))
        stack.stop()
    for name in ("rest_v2", "grpc"):
        if name in results:
            results[f"{name}_median_over_raw"] = float(np.median([p["over_raw"] for p in results[name]]))
    return results


def raw_best_points(bundle_dir: Path, combo: str, tensors: np.ndarray, args) -> list[dict]:
    """The raw engine's points that the predictor could reach: all threads on batches of 1 and of the batch size,
    and the single-threaded streams side by side."""
    points = [dict(raw_engine(bundle_dir, combo, tensors, batch, args.seconds / 2, args.threads, args.spinning),
                   mode=f"batch {batch}") for batch in (1, args.max_batch_size)]
    streams = args.engine_streams or args.threads
    if streams > 1:
        points.append(dict(raw_parallel(bundle_dir, combo, tensors, streams, args.seconds / 2),
                           mode=f"{streams} streams"))
    return points


# ---------------------------------------------------------------------------------------------------

def main() -> int:
    from serving.engine import ENGINES, installed, native_bf16

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".pneumoscope" / "bench" / "serving_throughput.json"))
    parser.add_argument("--bundle", default=str(ROOT / ".pneumoscope" / "bench" / "bundle224"))
    parser.add_argument("--images", type=int, default=64, help="real X-rays cycled through")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured point")
    parser.add_argument("--engines", default=",".join(e for e in ENGINES if installed(e)))
    parser.add_argument("--precisions", default="fp32,int8,bf16" if native_bf16() else "fp32,int8",
                        help="raw engine precisions (bf16: OpenVINO with native bf16 only)")
    parser.add_argument("--served", default="auto", help="stacks to drive: auto and/or ENGINE/PRECISION")
    parser.add_argument("--protocols", default="predictor,rest_v2,grpc",
                        help="predictor (alone, gRPC, 16 in flight), rest_v2, grpc (the whole stack)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--split-cores", action="store_true",
                        help="also: the predictor on half the CPUs, the transformer and the client on the other half "
                             "(the transformer with cores of its own, as in a cluster), against the raw engine there")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the predictor alone: raw engine and served point alternated this many times")
    parser.add_argument("--raw-batch", type=int, default=8, help="batched raw-engine point")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engine intra-op threads")
    parser.add_argument("--spinning", action="store_true")
    parser.add_argument("--engine-streams", type=int, default=None, help="served: parallel narrow engine runs")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0)
    parser.add_argument("--predictor-protocol", default="grpc-v2", choices=["grpc-v2", "v2"])
    parser.add_argument("--load-generator", default="asyncio", choices=sorted(LOAD_GENERATORS),
                        help="asyncio: requests serialised once, all in flight on one event loop (the default: the "
                             "generator shares the cores with the servers); libraries: httpx and tritonclient "
                             "threads, one per request in flight")
    parser.add_argument("--port", type=int, default=26480)
    parser.add_argument("--log-dir", default=str(ROOT / ".pneumoscope" / "bench" / "logs"))
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    combos = [f"{e}/{p}" for e in engines for p in args.precisions.split(",") if p
              and not (p == "bf16" and e != "openvino")]
    args.served = [t for t in args.served.split(",") if t]
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
    log(f"machine: {report['machine']}")

    def raw_pass(tag: str):
        for combo in combos:
            for batch in (1, args.raw_batch):
                point = raw_engine(bundle_dir, combo, tensors, batch, args.seconds, args.threads, args.spinning)
                report["raw"].setdefault(combo, {})[f"{tag}_b{batch}"] = point
                log(f"raw {combo} batch {batch} ({tag}): {point['img_per_s']} img/s, p50 {point['p50_ms']} ms")
            streams = args.engine_streams or args.threads
            if streams > 1:
                point = raw_parallel(bundle_dir, combo, tensors, streams, args.seconds)
                report["raw"][combo][f"{tag}_p{streams}"] = point
                log(f"raw {combo} {streams} single-threaded streams ({tag}): {point['img_per_s']} img/s, "
                    f"p50 {point['p50_ms']} ms")

    raw_pass("before")
    for k, target in enumerate(args.served):
        report["served"][target] = served(bundle_dir, encoded, tensors, args, target, args.port + 2 * k)
    if args.split_cores and len(os.sched_getaffinity(0)) >= 2:
        report["split_cores"] = split_cores(bundle_dir, encoded, tensors, args, args.port + 2 * len(args.served))
    raw_pass("after")
    report["load_average_end"] = os.getloadavg()
    report["summary"] = summarize(report)
    write_report(report, args.out)
    return 0


def summarize(report: dict) -> dict:
    """The goals, against the best raw engine x precision of the before/after passes AND the paired raw points.

    Goals (issue 19, default settings): the predictor alone over gRPC at 16 in flight >= 0.9 x the raw engine
    (its best point in the same run); the whole stack at 16 in flight >= 0.8 x the raw engine, REST and gRPC.
    Kept from before: p99 at one request in flight <= 1.25 x raw single-image latency + 10 ms.
    """
    best_raw = {combo: max(p["img_per_s"] for p in points.values()) for combo, points in report["raw"].items()}
    best_combo = max(best_raw, key=best_raw.get)
    out = {"raw_best_img_per_s": best_raw, "raw_best_overall": best_combo}
    for target, srv in report["served"].items():
        chosen = srv["chosen"]
        raw = report["raw"].get(chosen, {})
        alone = srv.get("predictor_alone_grpc_c16")
        if alone:
            out[f"{target}/predictor_alone_grpc"] = {"chosen": chosen, "img_per_s": alone["img_per_s"],
                                                     "raw_best_img_per_s": alone["raw_best_same_run"]["img_per_s"],
                                                     "over_raw": alone["over_raw_best"],
                                                     "goal_0.9x_raw": alone["over_raw_best"] >= 0.9}
        b1 = [raw[k] for k in raw if k.endswith("_b1")]
        for protocol in ("rest_v2", "grpc"):
            if protocol not in srv:
                continue
            points = srv[protocol]
            best = max(points.values(), key=lambda p: p["img_per_s"])
            c16 = points.get("c16", best)
            paired = [p["over_paired_raw_b1"] for p in points.values()]
            entry = {"chosen": chosen, "served_best_img_per_s": best["img_per_s"],
                     "served_best_at": f"c{best['concurrency']}", "served_c16_img_per_s": c16["img_per_s"],
                     "best_raw_overall": best_combo, "best_raw_overall_img_per_s": best_raw[best_combo],
                     "served_c16_over_best_raw_overall": round(c16["img_per_s"] / best_raw[best_combo], 3),
                     "served_c16_over_best_raw_of_chosen": round(c16["img_per_s"] / best_raw[chosen], 3)
                     if chosen in best_raw else None,
                     "served_over_paired_raw_b1": {k: p["over_paired_raw_b1"] for k, p in points.items()},
                     "median_served_over_paired_raw_b1": round(float(np.median(paired)), 3),
                     "goal_0.8x_raw_of_chosen_at_c16": chosen in best_raw
                     and c16["img_per_s"] >= 0.8 * best_raw[chosen],
                     "refused_at_c16": c16.get("refused", 0)}
            one = points.get("c1")
            if one and b1:
                pair = one["paired_raw_b1"]
                entry.update(raw_b1_p50_ms=round(float(np.median([p["p50_ms"] for p in b1])), 1),
                             raw_b1_p99_ms=round(float(np.median([p["p99_ms"] for p in b1])), 1),
                             served_c1_p50_ms=one["p50_ms"], served_c1_p99_ms=one["p99_ms"],
                             goal_p99_vs_raw_p50=one["p99_ms"] <= 1.25 * pair["p50_ms"] + 10,
                             goal_p99_vs_raw_p99=one["p99_ms"] <= 1.25 * pair["p99_ms"] + 10)
            out[f"{target}/{protocol}"] = entry
    split = report.get("split_cores")
    if split:
        out["split_cores"] = {f"{name}_c16_over_raw_same_cpus": split[f"{name}_median_over_raw"]
                              for name in ("rest_v2", "grpc") if f"{name}_median_over_raw" in split}
        out["split_cores"]["goal_0.9x_raw"] = all(v >= 0.9 for v in out["split_cores"].values())
    return out


if __name__ == "__main__":
    sys.exit(main())
