"""Cold start of the serving image: `docker run` of the predictor (and transformer) to the readiness path.

    python benchmarks/serving_cold_start.py --image ghcr.io/pneumoscope/serving:dev [--bundle DIR] [--repeat 5]

Runs each container the way the manifests do (non-root, read-only root filesystem, /tmp on tmpfs, the
bundle read-only at /mnt/models, 2 CPUs, engine auto, int8 allowed) and polls /v2/models/pneumonia/ready
every 50 ms. The predictors share a writable engine-choice folder (``--engine_choice_dir``, what a registry
tag does in a cluster): the first replica on this machine times the candidates and records its choice, the
later ones (``--repeat``) only gate it. Without --bundle, a test bundle (random ResNet-50 at 128 px, int8
accepted) is exported first; weights do not change load time, the graph size does (a 224 px model has the
same weights, so the same size). Prints one JSON object: for the first replica and the median of the later
ones, the wall seconds (goals: first <= 6 s, later <= 3 s) and the CPU seconds the container used until ready
(cgroup cpuacct when readable; the load-independent part), for the predictor and the transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DOCKER = "/usr/bin/docker"


def cpu_seconds(container: str) -> float | None:
    """CPU seconds the container has used: cgroup v1 cpuacct, or cgroup v2 cpu.stat (systemd or cgroupfs driver)."""
    full = subprocess.run([DOCKER, "inspect", "-f", "{{.Id}}", container], capture_output=True,
                          text=True).stdout.strip()
    usage = Path(f"/sys/fs/cgroup/cpuacct/docker/{full}/cpuacct.usage")
    if usage.exists():
        return int(usage.read_text()) / 1e9
    for stat in (Path(f"/sys/fs/cgroup/system.slice/docker-{full}.scope/cpu.stat"),
                 Path(f"/sys/fs/cgroup/docker/{full}/cpu.stat")):
        if stat.exists():
            fields = dict(line.split() for line in stat.read_text().splitlines())
            return int(fields["usage_usec"]) / 1e6
    return None


def run(image: str, bundle: Path, role: str, network: str, predictor: str | None,
        choices: Path) -> tuple[float, float | None, str]:
    from model.bundle import Bundle

    args = ["--model_name=pneumonia", "--http_port=8080", "--grpc_port=8081"]
    extra = []
    if role == "predictor":
        command = "pneumoscope-predictor"
        args += ["--model_uri=/mnt/models", "--engine=auto", "--precision=auto", "--threads=2",
                 "--engine_choice_dir=/var/cache/engine-choice",
                 f"--sha256={Bundle.load(bundle, verify=False).sha256}"]
        extra = ["--volume", f"{choices}:/var/cache/engine-choice:rw"]
    else:
        command = "pneumoscope-transformer"
        args += [f"--predictor_host={predictor}:8081", "--predictor_protocol=grpc-v2"]
    name = f"cold-start-{role}-{time.monotonic_ns()}"
    argv = [DOCKER, "run", "--detach", "--name", name, "--network", network, "--user", "10001:10001",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--cpus", "2",
            "--tmpfs", "/tmp:rw,size=1073741824,mode=1777", "--volume", f"{bundle}:/mnt/models:ro",
            "--publish", "127.0.0.1::8080", *extra, "--entrypoint", command, image, *args]
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


def _started(role: str) -> list[str]:
    """Containers of this role still there (a run that failed before it returned its name)."""
    found = subprocess.run([DOCKER, "ps", "-aq", "--filter", f"name=cold-start-{role}-"], capture_output=True,
                           text=True).stdout.split()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle.resolve() if args.bundle else None
        if bundle is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from serving_fixtures import build_bundle

            bundle, _ = build_bundle(Path(tmp) / "bundle", int8_accepted=True)
            for item in [Path(tmp), *Path(tmp).rglob("*")]:
                item.chmod(0o755 if item.is_dir() else 0o644)
        network = f"cold-start-{time.monotonic_ns()}"
        subprocess.run([DOCKER, "network", "create", network], capture_output=True, check=True)
        choices = Path(tmp) / "engine-choice"
        choices.mkdir(mode=0o777)
        choices.chmod(0o777)  # the containers' user writes the record
        times: dict[str, list[float]] = {"predictor": [], "transformer": []}
        cpu: dict[str, list[float]] = {"predictor": [], "transformer": []}
        try:
            for _ in range(args.repeat + 1):  # the first replica, then --repeat later ones
                names = []
                predictor = None
                for role in ("predictor", "transformer"):
                    try:
                        seconds, used, name = run(args.image, bundle, role, network, predictor, choices)
                    except BaseException:
                        subprocess.run([DOCKER, "rm", "--force", *names, *_started(role)], capture_output=True)
                        raise
                    predictor = predictor or name
                    names.append(name)
                    times[role].append(round(seconds, 2))
                    if used is not None:
                        cpu[role].append(round(used, 2))
                subprocess.run([DOCKER, "rm", "--force", *names], capture_output=True)
        finally:
            subprocess.run([DOCKER, "network", "rm", network], capture_output=True)
    report = {"load_average_start": load_start, "load_average_end": os.getloadavg()}
    for role, t in times.items():
        report[role] = {"runs_s": t, "first_s": t[0], "later_median_s": statistics.median(t[1:]),
                        "cpu_s": cpu[role], "first_cpu_s": cpu[role][0] if cpu[role] else None,
                        "later_median_cpu_s": statistics.median(cpu[role][1:]) if len(cpu[role]) > 1 else None}
    report["goal_first_predictor_at_most_6s"] = times["predictor"][0] <= 6.0
    report["goal_later_predictors_median_at_most_3s"] = statistics.median(times["predictor"][1:]) <= 3.0
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
