"""Chaos run: mixed load on the local stack with PostgreSQL while SIGKILL hits a random process every 20-40 s.

    python benchmarks/chaos.py [--minutes 10] [--out runs/chaos.json] [--keep runs/chaos]

The stack, each process started and supervised here as a kubelet would (a process that dies is started again
after a back-off of 0.5 s doubling to 10 s; a predictor that cannot fetch its model exits and is retried):
PostgreSQL 15 (the web app's database, committing durably), an MLflow tracking server (the registry the
predictor fetches ``models:/pneumonia/1`` from at every start), the predictor, the transformer and the web app.

The load, for --minutes: --web-clients doctors uploading real X-rays through the web app's API (one upload a
second each), --rest-clients and --grpc-clients sending the same films straight to the transformer (REST v2
binary and gRPC v2). Every 20-40 s (--kill-every) one of the five processes, at random (--seed), gets SIGKILL
(the MLflow server and the transformer with their whole process group).

The report: answers by type for each kind of client; per kill, the seconds until the process answered its
readiness probe again and until each kind of client next succeeded; studies accepted (201/202), lost (accepted
but not in the database, goal 0), still pending after the recovery wait, and scored twice (a second result
reaching a scored study, dropped and logged by the web app; goal 0). Exit status 1 when a study was lost or
scored twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import cpu_info, log, write_report  # noqa: E402

PASSWORD = "a-long-chaos-password"
KINDS = ("web", "rest", "grpc")


# -- supervised processes ----------------------------------------------------------------------------------

@dataclass
class Service:
    """One process of the stack, as a pod: started, probed, killed, started again after a back-off."""
    name: str
    ready_probe: object  # () -> bool
    argv: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0  # since it last stayed up for a minute (the back-off's exponent)
    starts: int = 0  # by the supervisor, the first included
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:  # a session of its own: killed with its children, as a pod is
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env={**os.environ, **self.env})
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            with _quiet():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.alive():
            with _quiet():
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def ready(self) -> bool:
        try:
            return bool(self.ready_probe())
        except Exception:
            return False


class PostgresService(Service):
    """PostgreSQL through pg_ctl (it daemonises): alive while the postmaster of ``postmaster.pid`` runs."""

    def __init__(self, server, probe):
        super().__init__("postgres", probe)
        self.server = server

    def pid(self) -> int | None:
        try:
            pid = int((self.server.data / "postmaster.pid").read_text().split()[0])
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        return pid if state != "Z" else None

    def start(self) -> None:
        from webapp_fixtures import PG_BIN, _as_pg_user

        subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(self.server.data), "-l", str(self.server.log),
                                    "-o", self.server.options, "-W", "start"]), capture_output=True, timeout=60)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.pid() is not None

    def kill(self) -> None:
        pid = self.pid()
        if pid:
            with _quiet():
                os.kill(pid, signal.SIGKILL)  # the postmaster; its backends notice and exit


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


class Supervisor:
    """Restarts what died (back-off 0.5 s doubling to 10 s, reset after 60 s up) and notes when each is ready."""

    def __init__(self, services: list[Service]):
        self.services = {s.name: s for s in services}
        self.ready_at: dict[str, list[float]] = defaultdict(list)
        self._was_ready = {name: False for name in self.services}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="supervisor")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            for name, service in self.services.items():
                if not service.alive():
                    self._was_ready[name] = False
                    if now >= service.next_start:
                        service.restarts += 1
                        service.starts += 1
                        service.next_start = now + min(10.0, 0.5 * 2 ** min(service.restarts - 1, 5))
                        service.start()
                    continue
                if now - service.started_at > 60:
                    service.restarts = 0
                if not self._was_ready[name] and service.ready():
                    self._was_ready[name] = True
                    self.ready_at[name].append(time.monotonic())

    def all_ready(self) -> bool:
        return all(s.alive() and s.ready() for s in self.services.values())


# -- load --------------------------------------------------------------------------------------------------

@dataclass
class Outcomes:
    events: list = field(default_factory=list)  # (monotonic time, kind, outcome)
    accepted: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, study: int | None = None) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind, outcome))
            if study is not None:
                self.accepted.add(study)

    def by_type(self) -> dict:
        counts: dict = {kind: Counter() for kind in KINDS}
        for _, kind, outcome in self.events:
            counts[kind][outcome] += 1
        return {kind: dict(sorted(c.items())) for kind, c in counts.items()}

    def first_success_after(self, moment: float) -> dict:
        return {kind: next((round(t - moment, 2) for t, k, o in self.events
                            if k == kind and t >= moment and o.startswith("ok")), None) for kind in KINDS}


def classify(exc: Exception) -> str:
    text = str(exc)
    if text.startswith("HTTP "):
        return "http_" + text.split()[1].rstrip(":")
    if text.startswith("gRPC "):
        return "grpc_" + text.split()[1].replace("StatusCode.", "")
    return type(exc).__name__ if not text.startswith("cannot reach") else "unreachable"


def web_client(url: str, token: str, films: list[Path], outcomes: Outcomes, stop: threading.Event, seed: int):
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=60) as api:
        while not stop.is_set():
            film = rng.choice(films)
            try:
                response = api.post("/api/studies", files={"file": (film.name, film.read_bytes(), "image/jpeg")})
            except httpx.HTTPError as exc:
                outcomes.add("web", type(exc).__name__)
                stop.wait(1.0)
                continue
            if response.status_code in (201, 202):  # 202: stored, scored later (the services behind are away)
                outcomes.add("web", "ok" if response.status_code == 201 else "ok_pending", response.json()["id"])
            else:
                outcomes.add("web", f"http_{response.status_code}")
            stop.wait(1.0)


def inference_client(kind: str, target: str, films: list[Path], outcomes: Outcomes, stop: threading.Event,
                     seed: int):
    from serving.client import ClientError, predict_grpc, predict_v2

    call = predict_v2 if kind == "rest" else predict_grpc
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            call(target, rng.choice(films).read_bytes(), timeout=30)
            outcomes.add(kind, "ok")
        except ClientError as exc:
            outcomes.add(kind, classify(exc))
            stop.wait(0.5)
        stop.wait(0.25)


# -- the run -------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 40.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--targets", default="predictor,transformer,web,postgres,mlflow")
    parser.add_argument("--web-clients", type=int, default=4)
    parser.add_argument("--rest-clients", type=int, default=2)
    parser.add_argument("--grpc-clients", type=int, default=2)
    parser.add_argument("--recovery-wait", type=float, default=300.0, help="seconds to wait for pending studies")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--keep", help="folder for the processes' logs and data (default: a temporary one)")
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args()

    import httpx
    import psycopg

    from mlflow_server import MlflowServer
    from serving.stack import free_port
    from serving_fixtures import XRAY_224, free_port_pair, shared_bundle, xray_files
    from webapp_fixtures import api_token, running_postgres

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pneumoscope-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    if not XRAY_224.exists():
        log(f"real X-rays not found at {XRAY_224}: the chaos run needs them")
        return 2
    films = xray_files(per_class=10)
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    log(f"chaos run: {args.minutes} min, a SIGKILL every {args.kill_every[0]:.0f}-{args.kill_every[1]:.0f} s on "
        f"{args.targets}; files in {root}")
    bundle, _ = shared_bundle()
    with running_postgres(durable=True) as server:
        database = server.create_database("chaos")
        mlflow = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlflow-artifacts"), root / "mlflow.log")
        mlflow.start()
        try:
            register_through_server(bundle, mlflow.url)
        finally:
            mlflow.stop()  # from here on the supervisor runs it, like every other process
        t_http = free_port_pair()  # the transformer: REST there, gRPC on the next port
        p_http, p_grpc = free_port({t_http, t_http + 1}), free_port({t_http, t_http + 1})
        web_port = free_port({p_http, p_grpc, t_http, t_http + 1})
        serving_env = {"MLFLOW_TRACKING_URI": mlflow.url, "PNEUMOSCOPE_THREADS": "1", "PYTHONUNBUFFERED": "1",
                       "PNEUMOSCOPE_ENGINE": "onnxruntime", "PNEUMOSCOPE_MODEL_CACHE": str(root / "model-cache")}
        web_env = {"PNEUMOSCOPE_HOME": str(root / "web"), "PNEUMOSCOPE_DATABASE_URL": database,
                   "PNEUMOSCOPE_SECRET_KEY": "chaos", "PNEUMOSCOPE_INFERENCE_URL": f"http://127.0.0.1:{t_http}",
                   "PNEUMOSCOPE_RETRY_INITIAL_S": "1", "PNEUMOSCOPE_RETRY_MAX_S": "10", "PYTHONUNBUFFERED": "1"}
        token = api_token(web_env, "doctor", PASSWORD)
        python = sys.executable

        def http_ok(url: str):
            return lambda: httpx.get(url, timeout=2).status_code == 200

        def pg_ok():
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{server.port}/chaos", connect_timeout=2):
                return True

        services = [
            PostgresService(server, pg_ok),
            Service("mlflow", http_ok(f"{mlflow.url}/health"), mlflow.argv(), {}, root / "mlflow.log"),
            Service("predictor", http_ok(f"http://127.0.0.1:{p_http}/v2/models/pneumonia/ready"),
                    [python, "-m", "serving.predictor_main", "--model_uri", "models:/pneumonia/1", "--http_port",
                     str(p_http), "--grpc_port", str(p_grpc), "--bind", "127.0.0.1"], serving_env,
                    root / "predictor.log"),
            Service("transformer", http_ok(f"http://127.0.0.1:{t_http}/v2/models/pneumonia/ready"),
                    [python, "-m", "serving.transformer_main", "--http_port", str(t_http), "--grpc_port",
                     str(t_http + 1), "--bind", "127.0.0.1", "--predictor_host", f"127.0.0.1:{p_grpc}"],
                    serving_env, root / "transformer.log"),
            Service("web", http_ok(f"http://127.0.0.1:{web_port}/readyz"),
                    [python, "-m", "webapp", "--host", "127.0.0.1", "--port", str(web_port)], web_env,
                    root / "web.log"),
        ]
        services[0].started_at = time.monotonic()  # running_postgres started it
        supervisor = Supervisor(services)
        supervisor.start()
        try:
            deadline = time.monotonic() + 600
            while not (supervisor.all_ready() and answers(f"http://127.0.0.1:{t_http}", films[0])):
                if time.monotonic() > deadline:
                    raise RuntimeError("the stack did not become ready within 10 min; see the logs in " + str(root))
                time.sleep(1)
            log("stack ready; load and kills start")
            outcomes, stop = Outcomes(), threading.Event()
            clients = ([threading.Thread(target=web_client, args=(f"http://127.0.0.1:{web_port}", token, films,
                                                                   outcomes, stop, args.seed + i))
                        for i in range(args.web_clients)]
                       + [threading.Thread(target=inference_client, args=("rest", f"http://127.0.0.1:{t_http}", films,
                                                                          outcomes, stop, args.seed + 100 + i))
                          for i in range(args.rest_clients)]
                       + [threading.Thread(target=inference_client, args=("grpc", f"127.0.0.1:{t_http + 1}", films,
                                                                          outcomes, stop, args.seed + 200 + i))
                          for i in range(args.grpc_clients)])
            for client in clients:
                client.daemon = True
                client.start()
            kills = []
            targets = args.targets.split(",")
            end = time.monotonic() + args.minutes * 60
            while True:
                wait = rng.uniform(*args.kill_every)
                if time.monotonic() + wait >= end:
                    time.sleep(max(0.0, end - time.monotonic()))
                    break
                time.sleep(wait)
                target = rng.choice(targets)
                killed_at = time.monotonic()
                supervisor.services[target].kill()
                kills.append((target, killed_at))
                log(f"SIGKILL {target}")
            stop.set()
            for client in clients:
                client.join(90)
            log("load stopped; waiting for the stack and the pending studies")
            deadline = time.monotonic() + 300
            while not supervisor.all_ready() and time.monotonic() < deadline:
                time.sleep(1)
            studies = wait_for_results(database, outcomes.accepted, args.recovery_wait)
        finally:
            supervisor.stop()
            for service in reversed(services[1:]):
                service.stop()

    lost = sorted(outcomes.accepted - set(studies))
    pending = sorted(s for s, status in studies.items() if status == "pending" and s in outcomes.accepted)
    web_log = (root / "web.log").read_text(errors="replace")
    scored_twice = web_log.count("already had a result")
    recoveries = []
    for target, killed_at in kills:
        ready = next((t for t in supervisor.ready_at[target] if t > killed_at), None)
        recoveries.append({"target": target, "at_s": round(killed_at - kills[0][1], 1) if kills else 0,
                           "seconds_to_ready": round(ready - killed_at, 2) if ready else None,
                           "first_success_after_s": outcomes.first_success_after(killed_at)})
    report = {"benchmark": "chaos", "minutes": args.minutes, "kill_every_s": list(args.kill_every),
              "seed": args.seed, "clients": {"web": args.web_clients, "rest": args.rest_clients,
                                             "grpc": args.grpc_clients},
              "kills": Counter(target for target, _ in kills), "answers_by_type": outcomes.by_type(),
              "recoveries": recoveries,
              "seconds_to_ready_max": {t: max((r["seconds_to_ready"] or 0) for r in recoveries if r["target"] == t)
                                       for t in {r["target"] for r in recoveries}},
              "studies": {"accepted": len(outcomes.accepted), "lost": len(lost), "lost_ids": lost[:20],
                          "pending_after_recovery": len(pending), "scored_twice": scored_twice},
              "starts": {name: s.starts for name, s in supervisor.services.items()},  # the first included
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_info(), "files": str(root)}
    write_report(report, args.out)
    log(f"{len(kills)} kills; {len(outcomes.accepted)} studies accepted, {len(lost)} lost, {len(pending)} still "
        f"pending, {scored_twice} scored twice")
    return 1 if lost or scored_twice else 0


def answers(transformer: str, film: Path) -> bool:
    """One real inference through the transformer and the predictor (the default transformer -> predictor
    protocol is gRPC: readiness alone would not show a wrong wiring)."""
    from serving.client import ClientError, predict_v2

    try:
        predict_v2(transformer, film.read_bytes(), timeout=30)
        return True
    except ClientError:
        return False


def register_through_server(bundle: Path, tracking_uri: str) -> None:
    """``models:/pneumonia/1`` = the bundle, uploaded as a run's artifacts (a tracking server refuses a local path
    as a version's source), tagged with its digest as the predictor requires."""
    from mlflow import MlflowClient

    from model.bundle import Bundle

    client = MlflowClient(tracking_uri, tracking_uri)
    run = client.create_run(client.create_experiment("chaos"))
    client.log_artifacts(run.info.run_id, str(bundle), "bundle")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("pneumonia")
    client.create_model_version("pneumonia", f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id,
                                tags={"bundle_sha256": Bundle.load(bundle).sha256})


def wait_for_results(database_url: str, accepted: set, timeout: float) -> dict:
    """{study id: status} of the accepted studies, once none is pending (or the time is up)."""
    from sqlalchemy import select

    from webapp.db import make_engine
    from webapp.models import Study

    engine = make_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as connection:
                    studies = dict(connection.execute(select(Study.id, Study.status)).all())
            except Exception:  # the database may still be recovering
                studies = {}
            waiting = [s for s in accepted if studies.get(s) == "pending"]
            if studies and (not waiting or time.monotonic() > deadline):
                return studies
            if time.monotonic() > deadline:
                return studies
            time.sleep(2)
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
