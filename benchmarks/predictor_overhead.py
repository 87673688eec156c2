"""The predictor's own CPU per request, beside its engine: what stands between the predictor and the raw engine.

    python benchmarks/predictor_overhead.py [--engine instant|real|both] [--seconds 8] [--rounds 3] [--out FILE]

The predictor (``python -m serving.predictor_main``, the benchmark bundle, OpenVINO int8) fed 16 gRPC requests in
flight by the asyncio load generator of ``serving_throughput.py`` (stage-1 pixels, as the transformer sends them).
Per round: requests per second, and CPU milliseconds per request of the predictor's main thread (gRPC, kserve's
data plane, ``predict``) and of the whole process, read from ``/proc`` per thread.

- ``instant``: the engine replaced by its own outputs for a zero image, computed once at load, so the engine costs
  nothing and the main thread's cost is the serving path alone (the main thread is the bottleneck);
- ``real``: the engine as served; the main thread's cost beside it (cores and caches shared), and the engine's
  threads (the process less its main thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import (AsyncGrpcLoad, AsyncPredictorLoad, build_bundle, cpu_info,  # noqa: E402
                                load_images, log, write_report)

#: run as the predictor's entry point: serving.predictor_main with the engine's runs answered from memory
INSTANT_ENGINE = """
import sys
import numpy as np
import serving.kserve_imports  # noqa: F401
from serving import predictor_main
from serving.predictor import PneumoniaPredictor

loaded = PneumoniaPredictor.load

def load(self):
    ready = loaded(self)
    outputs = self.run_engine(np.zeros((self.settings.max_batch_size, 1, self.image_size, self.image_size), np.float32))
    instant = lambda x: tuple(o[:len(x)] for o in outputs)
    self.batcher.run = instant
    self.batcher.run_wide = instant if self.batcher.run_wide else None
    return ready

PneumoniaPredictor.load = load
sys.exit(predictor_main.main())
"""


def cpu_ms(pid: int, tid: int | None = None) -> float:
    """User + system CPU of a process (or one of its threads), in milliseconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = open(path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


def measure(pid: int, target: str, payloads: list[bytes], seconds: float, concurrency: int = 16) -> dict:
    async def run() -> dict:
        client = AsyncPredictorLoad(target)
        await client.open()
        done = [0]

        async def worker(k: int, stop_at: float) -> None:
            i = k
            while time.perf_counter() < stop_at:
                await client(payloads[i % len(payloads)])
                done[0] += 1
                i += 1

        await asyncio.gather(*(worker(k, time.perf_counter() + 1.0) for k in range(concurrency)))  # warm
        done[0] = 0
        main0, all0, started = cpu_ms(pid, pid), cpu_ms(pid), time.perf_counter()
        await asyncio.gather(*(worker(k, started + seconds) for k in range(concurrency)))
        main1, all1, wall = cpu_ms(pid, pid), cpu_ms(pid), time.perf_counter() - started
        await client.close()
        n = max(1, done[0])
        return {"requests_per_s": round(n / wall, 1), "main_thread_cpu_ms": round((main1 - main0) / n, 3),
                "process_cpu_ms": round((all1 - all0) / n, 3),
                "other_threads_cpu_ms": round((all1 - all0 - main1 + main0) / n, 3)}

    return asyncio.run(run())


def serve(bundle: Path, engine: str, log_file: Path):
    """(process, gRPC target) of a predictor on free ports, once ready."""
    from model.bundle import Bundle
    from serving.stack import free_port

    http = free_port()
    grpc_port = free_port({http})
    env = dict(os.environ, PNEUMOSCOPE_ENGINE="openvino", PNEUMOSCOPE_PRECISION="int8",
               PNEUMOSCOPE_MODEL_SHA256=Bundle.load(bundle, verify=False).sha256)
    entry = ["-c", INSTANT_ENGINE] if engine == "instant" else ["-m", "serving.predictor_main"]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, *entry, "--model_uri", str(bundle), "--http_port", str(http),
                                "--grpc_port", str(grpc_port), "--bind", "127.0.0.1"], env=env, cwd=ROOT,
                               stdout=open(log_file, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the predictor exited with {process.returncode} before it was ready; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1) as reply:
                if reply.status == 200:
                    return process, f"127.0.0.1:{grpc_port}"
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"the predictor was not ready within 300 s; see {log_file}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["instant", "real", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=8.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=64, help="real X-rays cycled through")
    parser.add_argument("--bundle", default=str(ROOT / ".pneumoscope" / "bench" / "bundle224"))
    parser.add_argument("--log-dir", default=str(ROOT / ".pneumoscope" / "bench" / "logs"))
    parser.add_argument("--out")
    args = parser.parse_args()

    encoded, _ = load_images(args.images)
    bundle = build_bundle(Path(args.bundle), encoded)
    payloads = [AsyncPredictorLoad("unused").payload(data) for data in encoded]
    report = {"machine": cpu_info(), "load_average_start": os.getloadavg(), "concurrency": 16,
              "method": f"{AsyncGrpcLoad.__name__} pre-serialised gRPC requests, /proc per-thread CPU"}
    for engine in (["instant", "real"] if args.engine == "both" else [args.engine]):
        process, target = serve(bundle, engine, Path(args.log_dir) / f"predictor-overhead-{engine}.log")
        try:
            rounds = []
            for k in range(args.rounds):
                rounds.append(measure(process.pid, target, payloads, args.seconds))
                log(f"{engine} engine, round {k + 1}/{args.rounds}: {rounds[-1]}")
            report[engine] = rounds
        finally:
            process.terminate()
            process.wait(30)
    report["load_average_end"] = os.getloadavg()
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
