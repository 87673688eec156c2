"""What the transformer and the predictor share: kserve's ModelServer for one model, hardened.

The parts, each in a module of its own (as kserve's ``protocol/rest`` and ``protocol/grpc`` are):

- :mod:`serving.rest_server` and :mod:`serving.grpc_server`: the two transports, each with the
  model-repository extension refused (no control plane), admission, deadlines and message-size limits;
- :mod:`serving.refusals`: every refusal described and logged once, the same for both transports;
- :mod:`serving.dataplane`: binary REST v2 requests decoded by :mod:`model.wire_format` with their raw
  bytes kept, and a readiness that turns false while draining;
- :mod:`serving.server_logging`: our log format, without kserve's per-request lines;
- this module, the lifecycle: load the model (exit 2 with one line when its version cannot be had),
  start both servers on one event loop, and shut down gracefully on SIGTERM/SIGINT -- readiness goes
  false, intake stops, requests in flight get ``drain_timeout_s`` to finish (then a clean 503 /
  UNAVAILABLE), the servers stop, the models stop, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from kserve import ModelServer

from serving.admission import Admission
from serving.dataplane import PneumoscopeDataPlane
from serving.grpc_server import GRPCServer
from serving.rest_server import PneumoscopeRESTServer
from serving.server_logging import quiet_request_logging

log = logging.getLogger("pneumoscope.serving")


def check_workers(workers: int) -> None:
    if workers != 1:
        raise SystemExit("pneumoscope: --workers must be 1: each uvicorn worker would keep its own Prometheus "
                         "registry and /metrics would show one worker's share; scale with replicas instead")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (kserve's ``asyncio.run`` would silently use the default loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class PneumoscopeModelServer(ModelServer):
    """kserve's ModelServer for one model, hardened (see the module docstring).

    One REST worker only (see :func:`check_workers`); ``bind`` is ``0.0.0.0`` in a pod and
    ``127.0.0.1`` in the local stack.
    """

    def __init__(self, *, max_request_bytes: int, max_response_bytes: int, admission: Admission,
                 default_timeout_s: float, drain_timeout_s: float, access_log: bool = False, bind: str = "0.0.0.0",
                 **kwargs):
        check_workers(kwargs.get("workers", 1))
        self.bind = bind
        self.max_request_bytes, self.max_response_bytes = max_request_bytes, max_response_bytes
        self.default_timeout_s, self.drain_timeout_s = default_timeout_s, drain_timeout_s
        self.admission = admission
        super().__init__(**kwargs)
        self.dataplane = PneumoscopeDataPlane(model_registry=self.registered_models, admission=self.admission)
        self.model_repository_extension = None
        self._stopping: asyncio.Task | None = None
        quiet_request_logging(access_log)

    def start(self, models) -> None:
        """ModelServer.start for one worker, with our servers, bind address and signal handling."""
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING

        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = PneumoscopeRESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, None, self.http_port, access_log_format=self.access_log_format,
            workers=1, grace_period=5, event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            admission=self.admission, max_body_bytes=self.max_request_bytes, default_timeout_s=self.default_timeout_s)
        self._rest_server.config.host = self.bind
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            grpc_host = "[::]" if self.bind in ("0.0.0.0", "::") else self.bind
            self._grpc_server = GRPCServer(self.grpc_port, grpc_host, self.dataplane, self.admission,
                                           self.default_timeout_s, self.max_request_bytes, self.max_response_bytes)
            self.servers.append(self._grpc_server.start(self.max_threads))
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        self.setup_event_loop()  # kserve's exception handler and executor size, on the loop we run
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            loop.run_until_complete(self._serve())
            if self._stopping is not None:
                loop.run_until_complete(self._stopping)
            _finish_pending(loop)
        finally:
            loop.close()

    def _on_signal(self, sig: int) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.shutdown(sig))

    async def shutdown(self, sig: int | None = None) -> None:
        """Readiness false, intake stopped, in-flight requests drained, servers and models stopped."""
        models = list(self.registered_models.get_models().values())
        self.admission.draining = True  # readiness reports False from now on; new requests get 503
        log.info("shutting down (signal %s): readiness false, new requests refused, %d in flight get up to %.0f s",
                 sig, self.admission.inflight, self.drain_timeout_s)
        cancelled = await self.admission.drain(self.drain_timeout_s)
        log.info("drained%s; stopping the servers", f" ({cancelled} requests cut off with 503)" if cancelled else "")
        if self._grpc_server is not None:
            await self._grpc_server.stop(1.0)
        self._rest_server.stop()
        for model in models:
            model.stop()
            client = getattr(model, "client", None)
            if client is not None and hasattr(client, "close"):
                with contextlib.suppress(Exception):
                    await client.close()


def _finish_pending(loop: asyncio.AbstractEventLoop, timeout_s: float = 5.0) -> None:
    """Let stragglers finish, as ``asyncio.run`` would; cancel what is left."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=timeout_s))
    for task in asyncio.all_tasks(loop):
        task.cancel()
    leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


def load_and_serve(model, role: str, args, settings, max_request_bytes: int, max_response_bytes: int) -> int:
    """Load ``model`` (exit 2 with one line if its version cannot be had), then serve it until stopped."""
    from model.bundle import BundleError
    from model.registry import RegistryError
    from serving.engine import EngineError

    try:
        model.load()
    except (RegistryError, BundleError, FileNotFoundError, EngineError) as exc:
        print(f"pneumoscope {role}: error: {exc}", file=sys.stderr)
        return 2
    server = PneumoscopeModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                                    enable_grpc=args.enable_grpc, max_request_bytes=max_request_bytes,
                                    max_response_bytes=max_response_bytes, admission=settings.admission(role),
                                    default_timeout_s=settings.request_timeout_s,
                                    drain_timeout_s=settings.drain_timeout_s, access_log=settings.access_log,
                                    bind=args.bind)
    server.start([model])
    return 0
