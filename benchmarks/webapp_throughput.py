"""Upload throughput of the web app's API with 8 concurrent clients, on SQLite and on PostgreSQL.

    python benchmarks/webapp_throughput.py [--clients 8] [--seconds 30] [--out runs/webapp_throughput.json]

One serving stack (predictor + transformer, the 224 px benchmark bundle) serves every point. For each
database, a fresh web app process (``python -m webapp``: one uvicorn worker, as deployed) takes
``POST /api/studies`` of real full-resolution X-rays from N client threads for a fixed time:

- ``scored``: the normal path (store file + row, call the transformer, store the heatmap, answer 201);
  the model is the bottleneck here, so the transformer alone at the same concurrency is measured too;
- ``stored``: the transformer unreachable, every upload stored and answered 202 ``pending`` (the
  database and image-store path alone; the retry worker is held back for the run).

PostgreSQL 15 runs in a temporary folder, started as in the tests. Results: JSON (``--out``, stdout).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from webapp_latency import PASSWORD, Deployment, full_res, summary  # noqa: E402  (puts tests/ on sys.path)
from serving_throughput import cpu_info, log, write_report  # noqa: E402


def hammer(send, files: list[Path], clients: int, seconds: float) -> dict:
    """``clients`` threads each sending uploads for ``seconds``; latency and status counts."""
    datas = [(p.name, p.read_bytes()) for p in files]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            name, data = datas[i % len(datas)]
            started = time.perf_counter()
            status = send(name, data)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed * 1000)
                statuses[status] = statuses.get(status, 0) + 1
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"uploads_per_s": round(len(latencies) / wall, 2), "statuses": statuses, **summary(latencies)}


def api_sender(url: str, token: str):
    import httpx

    local = threading.local()

    def send(name: str, data: bytes) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=300)
        return local.client.post("/api/studies", files={"file": (name, data, "image/jpeg")}).status_code

    return send


def transformer_sender(rest: str):
    """The app's own transformer client (same request, kept-alive connection), one per thread."""
    import asyncio

    from webapp.inference import InferenceClient, InferenceRejected, InferenceUnavailable

    local = threading.local()

    def send(name: str, data: bytes) -> int:
        if not hasattr(local, "loop"):
            local.loop = asyncio.new_event_loop()
            local.client = InferenceClient(rest, timeout_s=300)
        try:
            local.loop.run_until_complete(local.client.infer(data))
            return 200
        except (InferenceRejected, InferenceUnavailable):
            return 500

    return send


def run(clients: int, seconds: float, model: str | None) -> dict:
    from webapp_fixtures import api_token, free_port, running_postgres, start_web

    files = full_res(40)
    out: dict = {}
    with Deployment(model, web=False) as deployment, running_postgres() as postgres:
        rest = deployment.info["rest"]
        log(f"transformer alone, {clients} clients")
        out["transformer"] = hammer(transformer_sender(rest), files, clients, seconds)
        for backend in ("sqlite", "postgresql"):
            with tempfile.TemporaryDirectory(prefix="pneumoscope-bench-web-") as home:
                database = postgres.create_database("bench") if backend == "postgresql" else None
                env = {"PNEUMOSCOPE_HOME": home, "PNEUMOSCOPE_SECRET_KEY": "bench",
                       **({"PNEUMOSCOPE_DATABASE_URL": database} if database else {})}
                token = api_token(env, "bench", PASSWORD)
                for mode, url in (("scored", rest), ("stored", f"http://127.0.0.1:{free_port()}")):
                    web = start_web({**env, "PNEUMOSCOPE_INFERENCE_URL": url, "PNEUMOSCOPE_RETRY_INITIAL_S": "3600"},
                                    Path(home) / f"web-{mode}.log")
                    try:
                        log(f"{backend}, {mode}: {clients} clients for {seconds:.0f} s")
                        out[f"{backend}_{mode}"] = hammer(api_sender(web.url, token), files, clients, seconds)
                    finally:
                        web.stop()
    base = out["transformer"]["uploads_per_s"]
    out["scored_vs_transformer"] = {b: round(out[f"{b}_scored"]["uploads_per_s"] / base, 3)
                                    for b in ("sqlite", "postgresql")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--model", help="a bundle folder or models:/ URI (default: the untrained 224 px bundle)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"benchmark": "webapp_throughput", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "machine": cpu_info(), "clients": args.clients, "seconds": args.seconds,
              **run(args.clients, args.seconds, args.model)}
    write_report(result, args.out, indent=1)


if __name__ == "__main__":
    main()
