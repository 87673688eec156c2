"""Cold start of the serving image: `docker run` of the predictor (and transformer) to the readiness path.

    python benchmarks/serving_cold_start.py --image ghcr.io/pneumoscope/serving:dev [--bundle DIR] [--repeat 5]

Runs each container the way the manifests do (non-root, read-only root filesystem, /tmp on tmpfs, the
bundle read-only at /mnt/models, 2 CPUs) and polls /v2/models/pneumonia/ready every 50 ms. Without
--bundle, a test bundle (random ResNet-50 at 128 px, int8 accepted) is exported first; weights do not
change load time, the graph size does (a 224 px model has the same weights, so the same size).
Prints one JSON object: per-run wall seconds and the median, and the CPU seconds the container used
until ready (cgroup v1 cpuacct; the load-independent part: on a shared, busy machine the wall time is
mostly waiting for a core), for the predictor and the transformer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DOCKER = "/usr/bin/docker"


def cpu_seconds(container: str) -> float | None:
    usage = Path(f"/sys/fs/cgroup/cpuacct/docker/{container}/cpuacct.usage")
    return int(usage.read_text()) / 1e9 if usage.exists() else None


def run(image: str, bundle: Path, role: str, network: str, predictor: str | None) -> tuple[float, float | None, str]:
    args = ["--model_name=pneumonia", "--model_uri=/mnt/models", "--http_port=8080", "--grpc_port=8081"]
    if role == "predictor":
        command = "pneumoscope-predictor"
        args += ["--precision=auto", "--threads=2"]
    else:
        command = "pneumoscope-transformer"
        args += [f"--predictor_host={predictor}:8081", "--predictor_protocol=grpc-v2"]
    name = f"cold-start-{role}-{time.monotonic_ns()}"
    argv = [DOCKER, "run", "--detach", "--name", name, "--network", network, "--user", "10001:10001",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--cpus", "2",
            "--tmpfs", "/tmp:rw,size=1073741824,mode=1777", "--volume", f"{bundle}:/mnt/models:ro",
            "--publish", "127.0.0.1::8080", "--entrypoint", command, image, *args]
    start = time.monotonic()
    container = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    port = subprocess.run([DOCKER, "port", container, "8080/tcp"], capture_output=True, text=True,
                          check=True).stdout.split()[0].rpartition(":")[2]
    url = f"http://127.0.0.1:{port}/v2/models/pneumonia/ready"
    while time.monotonic() - start < 120:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - start, cpu_seconds(container), name
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{role} not ready within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from serving_fixtures import build_bundle

            bundle, _ = build_bundle(Path(tmp) / "bundle", int8_accepted=True)
            for item in [Path(tmp), *Path(tmp).rglob("*")]:
                item.chmod(0o755 if item.is_dir() else 0o644)
        network = f"cold-start-{time.monotonic_ns()}"
        subprocess.run([DOCKER, "network", "create", network], capture_output=True, check=True)
        times: dict[str, list[float]] = {"predictor": [], "transformer": []}
        cpu: dict[str, list[float]] = {"predictor": [], "transformer": []}
        try:
            for _ in range(args.repeat):
                names = []
                predictor = None
                for role in ("predictor", "transformer"):
                    seconds, used, name = run(args.image, bundle, role, network, predictor)
                    predictor = predictor or name
                    names.append(name)
                    times[role].append(round(seconds, 2))
                    if used is not None:
                        cpu[role].append(round(used, 2))
                subprocess.run([DOCKER, "rm", "--force", *names], capture_output=True)
        finally:
            subprocess.run([DOCKER, "network", "rm", network], capture_output=True)
    print(json.dumps({role: {"runs_s": t, "median_s": statistics.median(t), "cpu_s": cpu[role],
                             "median_cpu_s": statistics.median(cpu[role]) if cpu[role] else None}
                      for role, t in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
