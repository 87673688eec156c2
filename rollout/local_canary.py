"""The local canary: two transformer+predictor stacks behind a real nginx that splits traffic by weight.

``pneumoscope rollout serve-local`` (and ``pneumoscope serve --traffic-split`` or ``--canary models:/NAME/N
--canary-percent P``, which hand over to it) runs :class:`LocalCanary`: nginx on PORT (REST) and PORT+1
(gRPC, h2c), one :class:`serving.stack.LocalStack` per model version on free ports, and a small controller.
``pneumoscope rollout ... --local`` talks to it through the state document of ``rollout.local``: the
controller starts or stops stacks, rewrites nginx's weights, reloads nginx (graceful: old workers finish
what they hold, so no request is dropped) and writes ``status`` with the same conditions and traffic
entries KServe writes.

The controller also writes ``targets.json`` (Prometheus file_sd): every transformer and predictor with the
labels ``component``, ``model_version`` and ``side``, so a local Prometheus follows promote and rollback.

The one module of ``rollout`` that imports ``serving``: the runner is built on its local stack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rollout import inferenceservice as isvc_
from rollout.errors import RolloutError
from rollout.local import LocalBackend, StateFile, merge_patch, owner, process_start_time
from rollout.settings import RolloutSettings

log = logging.getLogger(__name__)

SPLIT_PATH = "/_pneumoscope/split"  # answers the nginx configuration's generation (reload check)


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RolloutError("nginx is not installed (Debian: apt-get install nginx); the local canary needs it")


class Nginx:
    """A non-root nginx in its own prefix folder: REST on ``port``, gRPC (h2c) on ``port + 1``."""

    def __init__(self, workdir: Path, port: int, host: str = "127.0.0.1"):
        # absolute: nginx reads a relative -p, pid or log path against its own prefix, not our working folder
        self.workdir, self.port, self.host = Path(workdir).resolve(), port, host
        self.conf = self.workdir / "nginx.conf"
        self.process: subprocess.Popen | None = None
        self.generation = 0

    def render(self, sides: dict[str, tuple[int, int]], canary_percent: int | None) -> str:
        """``sides``: {"stable"|"canary": (rest port, grpc port)}; the canary gets ``canary_percent`` %."""
        w = self.workdir
        split = "    * stable;" if not canary_percent or "canary" not in sides else \
            f"    {canary_percent}% canary;\n    * stable;"
        upstreams = "\n".join(
            f"  upstream {name} {{ server 127.0.0.1:{rest}; keepalive 32; }}\n"
            f"  upstream {name}_grpc {{ server 127.0.0.1:{grpc}; keepalive 32; }}" for name, (rest, grpc) in sides.items())
        return f"""# Written by pneumoscope (rollout.local): the local canary's traffic split. Do not edit.
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
  client_body_temp_path {w}/tmp/body;
  proxy_temp_path {w}/tmp/proxy;
  fastcgi_temp_path {w}/tmp/fastcgi;
  uwsgi_temp_path {w}/tmp/uwsgi;
  scgi_temp_path {w}/tmp/scgi;
  log_format split '$time_iso8601 $side $status $upstream_addr $request_time "$request"';
  access_log {w}/access.log split;
  client_max_body_size 64m;
  # Bodies and answers stay in memory: as root, nginx's workers run as nobody and could not write to the
  # temp folders of the user who started it.
  client_body_buffer_size 64m;
  proxy_max_temp_file_size 0;
  # A weighted random split: each request's id is uniformly random.
  split_clients "${{request_id}}" $side {{
{split}
  }}
  map $side $side_grpc {{ stable stable_grpc; canary canary_grpc; }}
{upstreams}
  server {{
    listen {self.host}:{self.port};
    location = {SPLIT_PATH} {{ default_type text/plain; return 200 "{self.generation}"; }}
    location / {{
      proxy_pass http://$side;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 300s;
      # a side that refuses the connection (restarting) is retried on the other one, never dropped
      proxy_next_upstream error timeout;
      add_header X-Pneumoscope-Side $side always;
    }}
  }}
  server {{
    listen {self.host}:{self.port + 1} http2;
    location / {{ grpc_pass grpc://$side_grpc; grpc_read_timeout 300s; }}
  }}
}}
"""

    def configure(self, sides: dict[str, tuple[int, int]], canary_percent: int | None) -> None:
        """Write the weights and make nginx use them: start it, or reload it gracefully and wait until new
        connections see the new configuration."""
        self.generation += 1
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render(sides, canary_percent))
        check = subprocess.run([nginx_binary(), "-t", "-q", "-p", str(self.workdir), "-c", str(self.conf),
                                "-e", str(self.workdir / "error.log")], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RolloutError(f"nginx refused its configuration: {check.stderr.strip().splitlines()[-1:]}")
        if self.process is None or self.process.poll() is not None:
            from serving.stack import DIE_WITH_PARENT

            # nginx goes when the canary goes, even SIGKILLed: an orphan would keep the ports of the next canary
            self.process = subprocess.Popen([nginx_binary(), "-p", str(self.workdir), "-c", str(self.conf),
                                             "-e", str(self.workdir / "error.log")],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=open(self.workdir / "error.log", "ab"), start_new_session=True,
                                            preexec_fn=DIE_WITH_PARENT)
        else:
            self.process.send_signal(signal.SIGHUP)  # graceful reload
        self._wait_generation()

    def _wait_generation(self, timeout_s: float = 30.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.workdir / "error.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise RolloutError(f"nginx exited with code {self.process.returncode}: {tail}")
            try:
                with httpx.Client(timeout=2) as client:  # a new connection: reaches a new worker
                    if client.get(f"http://{self.host}:{self.port}{SPLIT_PATH}").text == str(self.generation):
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RolloutError(f"nginx did not take its new configuration within {timeout_s:.0f} s")

    def wait_old_workers(self, timeout_s: float = 330.0) -> None:
        """After a reload, old workers finish the requests they hold, then exit: wait for that, so a version
        is stopped only when no nginx worker can still send it anything."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(_children(self.process.pid)) > 1:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LocalCanary:
    """nginx + one serving stack per version + the controller that reconciles them with the state document."""

    def __init__(self, home: Path, port: int, model_name: str = "pneumonia", serving_settings=None,
                 env_for_version: Callable[[str], dict] | None = None, log_dir: Path | None = None):
        from serving.settings import ServingSettings

        self.state = StateFile(home)
        self.port, self.model_name = port, model_name
        self.serving_settings = serving_settings or ServingSettings()
        self.env_for_version = env_for_version or (lambda version: {})
        self.workdir = self.state.dir / f"nginx-{port}"
        self.log_dir = Path(log_dir) if log_dir else self.state.dir
        self.nginx = Nginx(self.workdir, port)
        self.stacks: dict[str, object] = {}  # version -> LocalStack
        self.sides: dict[str, str] = {}  # "stable"/"canary" -> version
        self._stop = threading.Event()
        self._busy = threading.Lock()  # a reconcile, or stop()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self, model_uri: str, timeout_s: float = 300.0) -> dict:
        from serving.stack import resolve_model

        if not model_uri.startswith("models:/"):
            raise RolloutError("the local canary serves registry versions: give --model models:/NAME/VERSION or "
                               "models:/NAME@ALIAS, not a folder")
        for port in (self.port, self.port + 1):
            if not _port_free(port):
                raise RolloutError(f"port {port} on 127.0.0.1 is in use (nginx needs {self.port} for REST and "
                                   f"{self.port + 1} for gRPC); choose another --port")
        previous = self.state.read()
        running = owner(previous)
        if running is not None and running != os.getpid():
            raise RolloutError(f"another local canary (pid {running}) uses {self.state.path}; "
                               "stop it or use another PNEUMOSCOPE_HOME")
        _, _, version = resolve_model(model_uri, self.serving_settings.mlflow_tracking_uri)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_stack(version, timeout_s)
        self.sides = {"stable": version}
        self._configure_nginx(None)
        doc = {"apiVersion": "pneumoscope.io/v1", "kind": "LocalCanary",
               "metadata": {"name": "local", "generation": 1,
                            "annotations": {isvc_.STABLE: version,
                                            isvc_.HISTORY: (previous or {}).get("metadata", {})
                                            .get("annotations", {}).get(isvc_.HISTORY, "[]")}},
               "spec": {"predictor": {"labels": {isvc_.VERSION_LABEL: version},
                                      "containers": [{"name": "predictor",
                                                      "args": [f"--model_uri=models:/{self.model_name}/{version}"]}]}}}
        with self.state.locked():
            self.state.write(doc)
        self._write_status(1, version, None, ready=True)
        self._thread = threading.Thread(target=self._run, name="local-canary-controller", daemon=True)
        self._thread.start()
        return self.info()

    def info(self) -> dict:
        return {"rest": f"http://127.0.0.1:{self.port}", "grpc": f"127.0.0.1:{self.port + 1}",
                "state": str(self.state.path), "prometheus_targets": str(self.state.targets),
                "sides": {side: {"version": v, **{k: self.stacks[v].info[k] for k in ("rest", "predictor_rest")}}
                          for side, v in self.sides.items()}}

    def stop(self) -> None:
        # The controller thread must outlive the stacks it started: a child's parent-death signal
        # (serving.stack) follows the THREAD that spawned it. So: stop everything, then the thread.
        with self._busy:
            self._stopping = True
            self.nginx.stop()
            for stack in list(self.stacks.values()):
                stack.stop()
            self.stacks.clear()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        # Only the state this process wrote: a canary that never started writes nothing (it once left
        # {"status": {}}), and one refused because another runs must not mark that one as stopped.
        with self.state.locked():
            doc = self.state.read()
            if doc and (doc.get("status") or {}).get("pid") == os.getpid():
                self.state.write(merge_patch(doc, {"status": {"pid": None, "pid_started": None}}))

    # -- the controller -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                doc = self.state.read() or {}
                generation = doc.get("metadata", {}).get("generation", 0)
                if generation > (doc.get("status") or {}).get("observedGeneration", 0):
                    with self._busy:
                        if not self._stopping:
                            self._reconcile(doc, generation)
            except Exception as exc:  # keep serving; the state says what went wrong
                log.exception("local canary: reconcile failed")
                self.error = str(exc)

    def _reconcile(self, doc: dict, generation: int) -> None:
        predictor = doc["spec"]["predictor"]
        version = isvc_.pinned_version(predictor, self.model_name)
        percent = predictor.get("canaryTrafficPercent")
        stable = self.sides["stable"]
        if version not in self.stacks:
            self._write_status(generation, version, percent, ready=False, message=f"starting version {version}")
            try:
                self._start_stack(version, 300.0)
            except Exception as exc:
                self._write_status(generation, version, percent, ready=False,
                                   message=f"version {version} failed to start: {str(exc)[:300]}")
                return
        if percent is not None and version != stable:  # a canary beside the stable version
            self.sides = {"stable": stable, "canary": version}
            self._configure_nginx(percent)
        else:  # one version takes everything; the other stops once nginx no longer sends it anything
            self.sides = {"stable": version}
            self._configure_nginx(None)
            self.nginx.wait_old_workers()
            for old in [v for v in self.stacks if v != version]:
                self.stacks.pop(old).stop()
        self._write_targets()
        self._write_status(generation, version, percent if version != stable else None, ready=True)

    def _start_stack(self, version: str, timeout_s: float) -> None:
        from serving.stack import LocalStack, free_port, port_free

        while True:
            port = free_port({self.port, self.port + 1})
            if port_free(port + 1):
                break
        stack = LocalStack(f"models:/{self.model_name}/{version}", port, self.serving_settings,
                           log_file=self.log_dir / f"stack-v{version}.log", restart=True,
                           extra_env=self.env_for_version(version))
        stack.start(timeout=timeout_s)
        self.stacks[version] = stack

    def _configure_nginx(self, percent: int | None) -> None:
        ports = {side: (self.stacks[v].port, self.stacks[v].port + 1) for side, v in self.sides.items()}
        self.nginx.configure(ports, percent)
        self._write_targets()

    def _write_targets(self) -> None:
        targets = []
        for side, version in self.sides.items():
            info = self.stacks[version].info
            for component, url in (("transformer", info["rest"]), ("predictor", info["predictor_rest"])):
                targets.append({"targets": [url.removeprefix("http://")],
                                "labels": {"component": component, "model_version": version, "side": side}})
        tmp = self.state.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(targets, indent=1))
        tmp.replace(self.state.targets)

    def _write_status(self, generation: int, version: str, percent: int | None, ready: bool,
                      message: str = "") -> None:
        latest = f"local-v{version}"
        if ready and percent is not None:
            traffic = [{"tag": "latest", "revisionName": latest, "percent": percent, "latestRevision": True},
                       {"tag": "prev", "revisionName": f"local-v{self.sides['stable']}", "percent": 100 - percent,
                        "latestRevision": False}]
        elif ready:
            traffic = [{"tag": "latest", "revisionName": latest, "percent": 100, "latestRevision": True}]
        else:
            traffic = None
        condition = {"status": "True" if ready else "False", "lastTransitionTime": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not ready:
            condition.update(reason="RevisionMissing", message=message)
        status = {"observedGeneration": generation, "pid": os.getpid(), "pid_started": process_start_time(os.getpid()),
                  "url": f"http://127.0.0.1:{self.port}",
                  "conditions": [dict(condition, type=t) for t in ("PredictorReady", "IngressReady", "Ready")],
                  "components": {"predictor": {"latestCreatedRevision": latest}}}
        if traffic is not None:
            status["components"]["predictor"].update(traffic=traffic, latestReadyRevision=latest)
            if percent is None:
                status["components"]["predictor"]["latestRolledoutRevision"] = latest
        self.state.update(lambda doc: dict(doc, status=status))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _port_free(port: int) -> bool:
    from serving.stack import port_free

    return port_free(port)


def add_serve_local(actions) -> None:
    """``pneumoscope rollout serve-local``: the flags of ``pneumoscope serve``'s stack, so that ``serve
    --traffic-split`` can hand its parsed command line over as it is."""
    from serving.cli import add_stack_arguments

    serve_local = actions.add_parser(
        "serve-local", help="run the local canary: nginx splitting traffic between one serving stack per version",
        description="A real nginx on PORT (REST) and PORT+1 (gRPC) in front of one transformer+predictor stack "
                    "per model version, splitting traffic by weight; `pneumoscope rollout ... --local` drives it "
                    "(`pneumoscope serve --traffic-split` is the same). Prints one line `READY {json}`; Ctrl-C or "
                    "SIGTERM stops it.")
    add_stack_arguments(serve_local)
    serve_local.set_defaults(func=cmd_serve_local)


def cmd_serve_local(args) -> int:
    """Run the local canary in the foreground."""
    import re

    from model.cli import CommandError
    from model.settings_cli import settings_from_args
    from rollout.controller import Rollout, check_percent
    from rollout.versions import Registry
    from serving.settings import ServingSettings
    from serving.stack import StackError

    serving_settings = settings_from_args(ServingSettings, args)
    settings = RolloutSettings(model_name=serving_settings.model_name)
    if serving_settings.mlflow_tracking_uri:
        settings = settings.model_copy(update={"mlflow_tracking_uri": serving_settings.mlflow_tracking_uri})
    canary_version = None
    try:
        if args.canary:
            match = re.match(r"^models:/([^/@]+)/(\d+)$", args.canary)
            if not match:
                raise RolloutError(f"--canary must be models:/NAME/VERSION with a version number, not {args.canary!r}")
            canary_version = match[2]
            check_percent(args.canary_percent)
    except RolloutError as exc:
        raise CommandError(str(exc)) from None
    log_dir = Path(args.log_file).resolve().parent if args.log_file else None
    local = LocalCanary(settings.home, args.port, settings.model_name, serving_settings, log_dir=log_dir)
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    try:
        registry = Registry(settings.model_name, settings.mlflow_tracking_uri) if canary_version else None
        if registry is not None:  # refused before anything starts (the canary repeats the check)
            registry.check_servable(canary_version, args.force)
        local.start(args.model, timeout_s=args.startup_timeout)
        if canary_version:
            Rollout(LocalBackend(settings), registry, settings.model_name).canary(canary_version, args.canary_percent,
                                                                                  args.force)
        print("READY " + json.dumps(local.info(), sort_keys=True), flush=True)
        while not stopping.wait(0.5):
            pass
        return 0
    except (RolloutError, StackError) as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        return 0
    finally:
        local.stop()
        signal.signal(signal.SIGTERM, previous)
