"""What the transformer and the predictor share: kserve's ModelServer with a few adjustments.

- :class:`PneumoscopeDataPlane`: binary REST v2 requests (``Inference-Header-Content-Length``) keep their
  raw bytes. kserve 0.21 turns every binary input into a Python list, which fails on encoded images
  (BYTES that are not UTF-8) and costs ~50k ``float()`` calls per 224 px tensor.
- a body-size guard in front of FastAPI: 413 before a large body is parsed, 400 for an empty one.
- REST handlers for our errors, quieter per-request logging, uvloop, one worker per process.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import orjson
from kserve import ModelServer
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from serving.errors import RequestRejected, install_handlers
from serving.metrics import reject_count

log = logging.getLogger("pneumoscope.serving")

INFERENCE_PATH_SUFFIXES = (":predict", ":explain", "/infer")


def parse_binary_request(body: bytes, json_length: Any, model_name: str) -> InferRequest:
    """REST v2 binary extension -> InferRequest whose binary inputs keep ``_raw_data`` (no list copy)."""
    try:
        length = int(json_length)
    except (TypeError, ValueError):
        raise RequestRejected("invalid_request", "Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise RequestRejected("invalid_request", f"Inference-Header-Content-Length {length} does not fit a "
                                                 f"{len(body)}-byte body")
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError as exc:
        raise RequestRejected("invalid_request", f"the JSON header of the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise RequestRejected("invalid_request", 'the request needs an "inputs" list')
    offset = length
    inputs = []
    for item in header["inputs"]:
        if not isinstance(item, dict) or not all(k in item for k in ("name", "shape", "datatype")):
            raise RequestRejected("invalid_request", "every input needs name, shape and datatype")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict) or not isinstance(item["shape"], list):
            raise RequestRejected("invalid_request", f"input {item['name']!r}: malformed shape or parameters")
        tensor = InferInput(name=str(item["name"]), shape=item["shape"], datatype=str(item["datatype"]),
                            parameters=parameters)
        if "data" in item:
            tensor.data = item["data"]
        elif "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise RequestRejected("invalid_request", f"input {item['name']!r}: binary_data_size {size!r} "
                                                         "runs past the end of the body")
            # kserve's own from_bytes sets this attribute too; as_numpy() reads it.
            tensor._raw_data = body[offset:offset + size]
            offset += size
        else:
            raise RequestRejected("invalid_request", f"input {item['name']!r} has neither data nor binary_data_size")
        inputs.append(tensor)
    outputs = header.get("outputs")
    requested = None
    if isinstance(outputs, list) and outputs:
        requested = [RequestedOutput(name=str(o.get("name")), parameters=o.get("parameters"))
                     for o in outputs if isinstance(o, dict)]
    parameters = header.get("parameters")
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                        parameters=parameters if isinstance(parameters, dict) else None,
                        request_outputs=requested)


class PneumoscopeDataPlane(DataPlane):
    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, bytes):
            return parse_binary_request(body, headers.get("inference-header-content-length"), model_name)
        return super().decode_inference_request(body, headers, model_name)

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        if getattr(model, "model_version", None):
            metadata["versions"] = [str(model.model_version)]
        metadata["platform"] = getattr(model, "platform", "") or ""
        return metadata


class BodyGuard:
    """ASGI middleware: buffer POST bodies up to ``max_bytes``; 413 beyond, 400 when an inference body is empty."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, 413, "too_large", f"the request body is {int(declared)} bytes; "
                                                              f"at most {self.max_bytes} are accepted")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send, 413, "too_large", f"the request body exceeds {self.max_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        if size == 0 and scope["path"].endswith(INFERENCE_PATH_SUFFIXES):
            return await self._refuse(send, 400, "empty", "the request body is empty")
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, reason: str, message: str):
        reject_count(reason)
        payload = orjson.dumps({"error": message, "reason": reason})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class _DropGrpcMethodLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("grpc method:")


def configure_logging(level: int = logging.INFO) -> None:
    """Our own loggers (``serving.*``, ``model.*``) in kserve's format; kserve configures its own.

    FastAPI warns about kserve's ORJSONResponse on every request: per-request stderr writes we drop.
    """
    import warnings

    try:
        from fastapi.exceptions import FastAPIDeprecationWarning

        warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)
    except ImportError:
        pass
    logging.basicConfig(level=level, format="%(asctime)s.%(msecs)03d %(process)s %(name)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")


def quiet_request_logging(access_log: bool) -> None:
    """kserve logs every gRPC call and every request's latency at INFO: per-request work we skip."""
    logging.getLogger("kserve").addFilter(_DropGrpcMethodLines())
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def prepare_app(max_body_bytes: int) -> None:
    """Adjust kserve's module-level FastAPI app before ModelServer.start() builds on it."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    install_handlers(app)

    async def invalid_request(_, exc: RequestValidationError):
        reject_count("invalid_request")
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(status_code=422, content={"error": f"malformed request: {where}: {first.get('msg', '')}",
                                                        "reason": "invalid_request"})

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes)


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


class _GRPCServer(GRPCServer):
    """kserve's gRPC server, bound to a chosen address instead of always ``[::]``."""

    def __init__(self, *args, host: str = "[::]", **kwargs):
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers):
        from concurrent import futures

        from grpc import aio
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
        from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
        from kserve.protocol.grpc.servicer import InferenceServicer

        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"{self._host}:{self._port}")
        log.info("gRPC server on %s:%s", self._host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class PneumoscopeModelServer(ModelServer):
    """kserve's ModelServer with our data plane, body guard, error handlers and a bind address.

    One REST worker only (see :func:`check_workers`); ``bind`` is ``0.0.0.0`` in a pod and
    ``127.0.0.1`` in the local stack.
    """

    def __init__(self, *, max_body_bytes: int, grpc_max_message_bytes: int, access_log: bool = False,
                 bind: str = "0.0.0.0", **kwargs):
        import kserve.model_server as model_server

        check_workers(kwargs.get("workers", 1))
        # GRPCServer reads its message limits from the module-level parsed arguments.
        self._grpc_options = dict(vars(model_server.args), grpc_max_receive_message_length=grpc_max_message_bytes,
                                  grpc_max_send_message_length=max(grpc_max_message_bytes,
                                                                   model_server.args.grpc_max_send_message_length))
        self.bind = bind
        super().__init__(**kwargs)
        self.dataplane = PneumoscopeDataPlane(model_registry=self.registered_models)
        quiet_request_logging(access_log)
        prepare_app(max_body_bytes)

    def start(self, models) -> None:
        """ModelServer.start for one worker, with our bind address (kserve hard-codes 0.0.0.0 / [::])."""
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.protocol.rest.server import RESTServer

        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       self.http_port, access_log_format=self.access_log_format, workers=1,
                                       grace_period=self.grace_period, event_loop=self.event_loop,
                                       timeout_keep_alive=self.timeout_keep_alive)
        self._rest_server.config.host = self.bind
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            grpc_host = "[::]" if self.bind in ("0.0.0.0", "::") else self.bind
            self._grpc_server = _GRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                            kwargs=self._grpc_options, grace_period=self.grace_period, host=grpc_host)
            self.servers.append(self._grpc_server.start(self.max_threads))
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        self.setup_event_loop()  # kserve's exception handler and executor size, on the loop we run
        self.register_signal_handler()
        try:
            loop.run_until_complete(self._serve())
            _finish_pending(loop)
        finally:
            loop.close()


def _finish_pending(loop: asyncio.AbstractEventLoop, timeout_s: float = 5.0) -> None:
    """Let kserve's shutdown task (gRPC server stop) finish, as ``asyncio.run`` would; cancel stragglers."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=timeout_s))
    for task in asyncio.all_tasks(loop):
        task.cancel()
    leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


def load_and_serve(model, role: str, args, max_body_bytes: int, access_log: bool) -> int:
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
                                    enable_grpc=args.enable_grpc, max_body_bytes=max_body_bytes,
                                    grpc_max_message_bytes=max_body_bytes, access_log=access_log, bind=args.bind)
    server.start([model])
    return 0
