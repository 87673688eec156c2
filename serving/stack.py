"""The local serving stack: a predictor and a transformer as two processes on loopback.

``pneumoscope serve`` runs it in the foreground; tests and benchmarks use :class:`LocalStack` directly.
The transformer listens on ``port`` (REST) and ``port + 1`` (gRPC); the predictor on free ports.
With ``web_port`` the doctor's web app (``python -m webapp``) runs beside them, calling the transformer; with
``gateway_port`` the DICOM gateway (``python -m gateway``) too, recording into the web app's database.
A ``models:/NAME@ALIAS`` URI is resolved to a version once, here, and the predictor loads that
pinned version (the transformer holds no version). Like a kubelet, the stack restarts a process that
dies (with a short back-off). Stopping drains the web app and the transformer first (SIGTERM, then each
finishes what it holds), then the predictor, so that nothing in flight loses its predictor; SIGKILL only
after the drain time.

No kserve import here: a test process may also want tritonclient, whose protobuf package clashes
with kserve's in one interpreter.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.settings_cli import settings_environment
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class StackError(Exception):
    """The stack cannot start: a port in use, a bad model URI, a child that died while starting."""


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Nobody listens there. SO_REUSEADDR, as the servers use it: connections in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(avoid: set[int] = frozenset()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in avoid and port_free(port):
            return port


def resolve_model(model_uri: str, tracking_uri: str | None = None, sha256: str | None = None) -> tuple[str, str, str]:
    """(pinned uri, model name, version). Aliases are resolved here, once; folders are checked, and need
    their expected digest (the predictor verifies every hash against it)."""
    if model_uri.startswith("models:/"):
        from model.registry import connect, resolve_model_uri

        name, version, pinned = resolve_model_uri(model_uri, connect(tracking_uri))
        return pinned, name, version
    from model.bundle import Bundle

    path = Path(model_uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise StackError(f"model not found: {model_uri} is neither a bundle folder nor a models:/ URI")
    if not sha256:
        raise StackError(f"{model_uri} is a model folder: give its expected bundle digest with --sha256 (the "
                         "registry's bundle_sha256 tag of the version it came from); nothing unverified is served")
    from model.bundle import BundleError

    try:
        bundle = Bundle.load(path, verify=False, expected_sha256=sha256)  # the predictor verifies every file
    except BundleError as exc:
        raise StackError(f"{model_uri}: {exc}") from None
    return str(path.resolve()), bundle.meta.get("model_name", "pneumonia"), str(bundle.meta.get("version", "local"))


def _load_libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except (OSError, ImportError):
        return None


_LIBC = _load_libc() if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: no imports, no locks, one syscall."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the children go when the stack goes


#: ``preexec_fn`` of a child that must not outlive the thread that starts it (None where prctl is missing)
DIE_WITH_PARENT = _die_with_parent if _LIBC is not None else None


@dataclass
class _Child:
    role: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    restarts: int = 0
    started: float = 0.0


@dataclass
class LocalStack:
    model_uri: str
    port: int
    settings: ServingSettings = field(default_factory=ServingSettings)
    predictor_protocol: str | None = None
    log_file: str | Path | None = None  # children's output; default: this process's stderr
    restart: bool = True
    extra_env: dict = field(default_factory=dict)
    web_port: int | None = None  # also run the web app here (None: no web app)
    gateway_port: int | None = None  # also run the DICOM gateway's Storage SCP here (None: no gateway)

    def __post_init__(self):
        self.predictor_protocol = self.predictor_protocol or self.settings.predictor_protocol
        self.children: dict[str, _Child] = {}
        self.info: dict = {}
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._workdir: str | None = None
        self._log = None
        self._monitor: threading.Thread | None = None
        self.exit_codes: dict[str, int] = {}  # filled by stop(), in the order the children exited

    # -- start -------------------------------------------------------------------------------------
    def start(self, timeout: float = 240.0, supervise_in_background: bool = True) -> dict:
        for port in (self.port, self.port + 1):
            if not port_free(port):
                raise StackError(f"port {port} on {LOOPBACK} is in use (the transformer needs {self.port} for REST "
                                 f"and {self.port + 1} for gRPC); choose another --port")
        if self.web_port is not None and (self.web_port in (self.port, self.port + 1) or not port_free(self.web_port)):
            raise StackError(f"port {self.web_port} on {LOOPBACK} is in use (the web app needs it); choose another "
                             f"--web-port")
        if self.gateway_port is not None:
            self._check_gateway()
        pinned, name_in_registry, version = resolve_model(self.model_uri, self.settings.mlflow_tracking_uri,
                                                          self.settings.model_sha256)
        name = self.settings.model_name
        taken = {self.port, self.port + 1, self.web_port, self.gateway_port}
        p_http = free_port(taken)
        p_grpc = free_port(taken | {p_http})
        self._workdir = tempfile.mkdtemp(prefix="pneumoscope-stack-")
        self._log = open(self.log_file, "ab", buffering=0) if self.log_file else None
        # The children's flags wire them together; their settings travel as environment variables (_env).
        predictor = [sys.executable, "-m", "serving.predictor_main", "--model_uri", pinned,
                     "--http_port", str(p_http), "--grpc_port", str(p_grpc), "--bind", LOOPBACK]
        target = f"{LOOPBACK}:{p_grpc if self.predictor_protocol == 'grpc-v2' else p_http}"
        transformer = [sys.executable, "-m", "serving.transformer_main",
                       "--http_port", str(self.port), "--grpc_port", str(self.port + 1), "--bind", LOOPBACK,
                       "--predictor_host", target]
        self.children = {"predictor": _Child("predictor", predictor), "transformer": _Child("transformer", transformer)}
        if self.web_port is not None:
            self.children["web"] = _Child("web", [sys.executable, "-m", "webapp", "--host", LOOPBACK, "--port",
                                                  str(self.web_port)],
                                          env={"PNEUMOSCOPE_INFERENCE_URL": f"http://{LOOPBACK}:{self.port}"})
        gateway_metrics = None
        if self.gateway_port is not None:
            # Beside the web app, in its database: films from a PACS show in its list (source PACS).
            gateway_metrics = free_port(taken | {p_http, p_grpc})
            self.children["gateway"] = _Child("gateway", [
                sys.executable, "-m", "gateway", "--host", LOOPBACK, "--port", str(self.gateway_port),
                "--metrics-port", str(gateway_metrics)],
                env={"PNEUMOSCOPE_INFERENCE_URL": f"http://{LOOPBACK}:{self.port}"})
        try:
            self._spawn(self.children["predictor"])
            self._wait_ready(self.children["predictor"], f"http://{LOOPBACK}:{p_http}/v2/models/{name}/ready", timeout)
            self._spawn(self.children["transformer"])
            self._wait_ready(self.children["transformer"], f"http://{LOOPBACK}:{self.port}/v2/models/{name}/ready",
                             timeout, grpc_port=self.port + 1)
            if self.web_port is not None:
                self._spawn(self.children["web"])
                self._wait_ready(self.children["web"], f"http://{LOOPBACK}:{self.web_port}/readyz", timeout)
            if self.gateway_port is not None:
                self._spawn(self.children["gateway"])
                self._wait_ready(self.children["gateway"], f"http://{LOOPBACK}:{gateway_metrics}/readyz", timeout)
        except BaseException:
            self.stop()
            raise
        self.info = {"rest": f"http://{LOOPBACK}:{self.port}", "grpc": f"{LOOPBACK}:{self.port + 1}",
                     "model_name": name, "model_version": version, "model_uri": pinned,
                     "requested_uri": self.model_uri, "predictor_rest": f"http://{LOOPBACK}:{p_http}",
                     "predictor_grpc": f"{LOOPBACK}:{p_grpc}", "predictor_protocol": self.predictor_protocol,
                     "precision": self.settings.precision, "pids": self.pids()}
        if self.web_port is not None:
            self.info["web"] = f"http://{LOOPBACK}:{self.web_port}"
        if self.gateway_port is not None:
            self.info["gateway"] = {"dicom": f"{LOOPBACK}:{self.gateway_port}", "ae_title": _gateway_ae_title(),
                                    "metrics": f"http://{LOOPBACK}:{gateway_metrics}"}
        if name_in_registry and name_in_registry != name and self.model_uri.startswith("models:/"):
            self.info["registered_name"] = name_in_registry
        if supervise_in_background and self.restart:
            self._monitor = threading.Thread(target=self.supervise, name="stack-supervisor", daemon=True)
            self._monitor.start()
        return self.info

    def _check_gateway(self) -> None:
        import importlib.util

        if importlib.util.find_spec("gateway") is None or importlib.util.find_spec("pynetdicom") is None:
            raise StackError("the DICOM gateway is not installed here (pip install 'pneumoscope[web,gateway]')")
        if self.gateway_port in (self.port, self.port + 1, self.web_port) or not port_free(self.gateway_port):
            raise StackError(f"port {self.gateway_port} on {LOOPBACK} is in use (the DICOM gateway needs it); choose "
                             f"another --gateway-port")

    def pids(self) -> dict:
        return {role: c.process.pid for role, c in self.children.items() if c.process}

    def _env(self) -> dict:
        """Every child's settings, as environment variables: the stack's settings, then ``extra_env``."""
        settings = self.settings.model_copy(update={"predictor_protocol": self.predictor_protocol})
        env = settings_environment(settings, exclude=("model_cache",))
        return {**env, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in self.extra_env.items()}}

    def _spawn(self, child: _Child) -> None:
        env = {**self._env(), **child.env}
        cache = Path(self._workdir) / child.role  # a download folder of its own, whatever model_cache says
        cache.mkdir(parents=True, exist_ok=True)
        env["PNEUMOSCOPE_MODEL_CACHE"] = str(cache)
        out = self._log if self._log else sys.stderr
        # A session of its own: a terminal's Ctrl-C reaches only the stack, which stops the children by PID.
        child.process = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True,
                                         preexec_fn=DIE_WITH_PARENT)
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.role, child.process.pid)

    def _wait_ready(self, child: _Child, url: str, timeout: float, grpc_port: int | None = None) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = child.process.poll()
            if code is not None:
                raise StackError(f"the {child.role} exited with code {code} while starting: {self._last_error()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200 and (grpc_port is None or not port_free(grpc_port)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise StackError(f"the {child.role} did not become ready within {timeout:.0f} s: {self._last_error()}")

    def _last_error(self) -> str:
        if not self.log_file:
            return "see its log above"
        try:
            lines = Path(self.log_file).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    # -- run ---------------------------------------------------------------------------------------
    def supervise(self, poll_s: float = 0.5) -> None:
        """Restart children that die, until :meth:`stop` (back-off doubles up to 10 s, like a kubelet)."""
        while not self._stopping.wait(poll_s):
            with self._lock:
                if self._stopping.is_set():
                    return
                for child in self.children.values():
                    if child.process is not None and child.process.poll() is not None:
                        delay = min(10.0, 0.5 * 2 ** min(child.restarts, 5))
                        if time.monotonic() - child.started < delay:
                            continue
                        log.warning("%s exited with code %s; restarting it (restart %d)", child.role,
                                    child.process.returncode, child.restarts + 1)
                        child.restarts += 1
                        self._spawn(child)

    def kill(self, role: str) -> int:
        """SIGKILL one child (tests: the predictor goes down). Returns its PID."""
        with self._lock:
            process = self.children[role].process
            process.kill()
            process.wait()
            self.children[role].started = time.monotonic()
            return process.pid

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the gateway, the web app, then the transformer, then the predictor, each drained and gone before the
        next."""
        self._stopping.set()
        grace_s = self.settings.drain_timeout_s + 10.0 if grace_s is None else grace_s
        with self._lock:
            for role in ("gateway", "web", "transformer", "predictor"):
                child = self.children.get(role)
                process = child.process if child else None
                if process is None or process.poll() is not None:
                    continue
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not exit within %.0f s of SIGTERM; killing it", role, grace_s)
                    process.kill()
                    process.wait()
                self.exit_codes[role] = process.returncode
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2)
        if self._log:
            self._log.close()
            self._log = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "LocalStack":
        if not self.info:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _gateway_ae_title() -> str:
    """The gateway's AE title as its settings will read it (no import of the gateway: it sits beside serving)."""
    import os

    return os.environ.get("PNEUMOSCOPE_GATEWAY_AE_TITLE", "PNEUMOSCOPE").strip() or "PNEUMOSCOPE"


def ready_line(info: dict) -> str:
    return "READY " + json.dumps(info, sort_keys=True)
