"""What the transformer and the predictor share: kserve's ModelServer, hardened.

- **No control plane**: KServe's model-repository extension (``/v2/repository/...`` load/unload) is
  refused with 404 before it reaches kserve's routes, and the gRPC ``RepositoryModelLoad/Unload``
  with UNIMPLEMENTED. kserve 0.21 has no switch for it: its RESTServer always registers the routes.
- **Admission** (:class:`RequestGuard` for REST, :class:`Servicer` for gRPC, one
  :class:`~serving.admission.Admission` for both): a bounded number of inference requests in flight,
  the rest refused at once (503 + Retry-After / RESOURCE_EXHAUSTED); every request runs under a
  deadline; a REST client that disconnects has its work cancelled.
- **Message sizes** per hop and role: the REST body guard and gRPC's receive/send limits.
- **Errors**: every refusal is a :class:`~serving.errors.ServiceError` (or a kserve error) answered
  with one line and logged once, at INFO/WARNING, without a traceback; anything unexpected becomes
  a generic 500 / INTERNAL carrying a request id, logged once with its traceback.
- **Graceful shutdown** (SIGTERM/SIGINT): readiness goes false, intake stops, requests in flight get
  ``drain_timeout_s`` to finish (then a clean 503 / UNAVAILABLE), the servers stop, the models stop,
  exit 0.
- :class:`PneumoscopeDataPlane`: binary REST v2 requests keep their raw bytes (kserve 0.21 turns
  every binary input into a Python list); readiness reflects draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import time
import uuid
from typing import Any

import orjson
from kserve import ModelServer
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest.server import RESTServer, _RefreshingServer

from serving.admission import Admission, set_deadline, timeout_from_headers
from serving.errors import DeadlineExceeded, RequestRejected, ServiceError, ShuttingDown
from serving.metrics import CANCELLED, GRPC_TO_HTTP, count_request, reject_count

log = logging.getLogger("pneumoscope.serving")

INFERENCE_PATH_SUFFIXES = (":predict", ":explain", "/infer")
REPOSITORY_PATH = "/v2/repository"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe in logs and gRPC metadata
#: Seconds a request may overrun its deadline (decoding is not interruptible) before it is cut off with 504.
DEADLINE_GRACE_S = 2.0


# -- errors: one description for REST and gRPC ---------------------------------------------------

def describe(exc: BaseException) -> tuple[int, str, str, str, int | None]:
    """(HTTP status, gRPC code name, reason, one-line message, Retry-After) of a known error."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.grpc_code, exc.reason, exc.message, exc.retry_after
    if isinstance(exc, InvalidInput):
        return 400, "INVALID_ARGUMENT", "invalid_request", str(exc)[:500], None
    if isinstance(exc, ModelNotFound):
        return 404, "NOT_FOUND", "unknown_model", str(exc)[:200], None
    if isinstance(exc, (ModelNotReady, ServerNotReady, ServerNotLive)):
        return 503, "UNAVAILABLE", "not_ready", "the model is not ready; retry shortly", 1
    if isinstance(exc, NotImplementedError):
        return 501, "UNIMPLEMENTED", "not_implemented", "not implemented by this server", None
    raise exc


def _known(exc: BaseException) -> bool:
    return isinstance(exc, (ServiceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, ServerNotLive,
                            NotImplementedError))


def log_refusal(status: int, reason: str, message: str, where: str) -> None:
    """Each refusal once, without a traceback: INFO for the client's mistakes, WARNING for ours (DEBUG for
    readiness probes answered "not ready", which the kubelet asks every few seconds)."""
    level = logging.DEBUG if reason == "not_ready" else logging.INFO if status < 500 else logging.WARNING
    log.log(level, "%s refused (%d %s): %s", where, status, reason, message[:300])


def request_id(value: str | None) -> str:
    """The client's x-request-id when it is well-formed, otherwise a fresh one."""
    return value if value and _REQUEST_ID.match(value) else uuid.uuid4().hex


def check_request_id(value: str | None) -> None:
    if value is not None and not _REQUEST_ID.match(value):
        reject_count("invalid_header")
        raise RequestRejected("invalid_header", "x-request-id must be 1-128 printable ASCII characters")


# -- REST v2 binary extension ---------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _malformed(message: str) -> RequestRejected:
    reject_count("invalid_request")
    return RequestRejected("invalid_request", message)


def parse_binary_request(body: bytes, json_length: Any, model_name: str) -> InferRequest:
    """REST v2 binary extension -> InferRequest whose binary inputs keep ``_raw_data`` (no list copy).

    Everything the client controls is type-checked here, before any work: the JSON header, names,
    datatypes, shapes (non-negative integers), ids, parameters and the binary sizes.
    """
    try:
        length = int(json_length)
    except (TypeError, ValueError):
        raise _malformed("Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise _malformed(f"Inference-Header-Content-Length {length} does not fit a {len(body)}-byte body")
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError as exc:
        raise _malformed(f"the JSON header of the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or len(header["inputs"]) > 16:
        raise _malformed('the request needs an "inputs" list (of at most 16 inputs)')
    request_id_value = header.get("id")
    if request_id_value is not None and not (isinstance(request_id_value, str) and len(request_id_value) <= 256):
        raise _malformed('the request "id" must be a string of at most 256 characters')
    offset = length
    inputs = []
    for item in header["inputs"]:
        if not isinstance(item, dict) or not all(k in item for k in ("name", "shape", "datatype")):
            raise _malformed("every input needs name, shape and datatype")
        name, shape, datatype = item["name"], item["shape"], item["datatype"]
        parameters = item.get("parameters") or {}
        if not isinstance(name, str) or not isinstance(datatype, str) or len(name) > 64 or len(datatype) > 16:
            raise _malformed("input names and datatypes must be short strings")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(_is_int(d) and 0 <= d <= 1 << 31 for d in shape)):
            raise _malformed(f"input {name!r}: shape must be a list of at most 8 non-negative integers")
        if not isinstance(parameters, dict):
            raise _malformed(f"input {name!r}: parameters must be an object")
        tensor = InferInput(name=name, shape=shape, datatype=datatype, parameters=parameters)
        if "data" in item:
            tensor.data = item["data"]
        elif "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not _is_int(size) or size < 0 or offset + size > len(body):
                raise _malformed(f"input {name!r}: binary_data_size {str(size)[:20]!r} runs past the end of the body")
            # kserve's own from_bytes sets this attribute too; as_numpy() reads it.
            tensor._raw_data = body[offset:offset + size]
            offset += size
        else:
            raise _malformed(f"input {name!r} has neither data nor binary_data_size")
        inputs.append(tensor)
    outputs = header.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or len(outputs) > 16 or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("parameters") or {}, dict)
                for o in outputs):
            raise _malformed('"outputs" must be a list of at most 16 {"name": ...} objects')
        requested = [RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in outputs] or None
    parameters = header.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _malformed('"parameters" must be an object')
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=request_id_value,
                        parameters=parameters, request_outputs=requested)


class PneumoscopeDataPlane(DataPlane):
    def __init__(self, *args, admission: Admission | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.admission = admission

    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, bytes):
            return parse_binary_request(body, headers.get("inference-header-content-length"), model_name)
        return super().decode_inference_request(body, headers, model_name)

    def _draining(self) -> bool:
        return self.admission is not None and self.admission.draining

    async def ready(self) -> bool:
        """Ready while every model is, and not while draining (KServe's DataPlane always says True)."""
        if self._draining():
            return False
        models = self.model_registry.get_models().values()
        return bool(models) and all([await m.healthy() for m in models])

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        """Readiness probes see False while draining. kserve's inference handlers ask with
        ``disable_predictor_health_check=True``: requests already admitted must still run."""
        ready = await super().model_ready(model_name, disable_predictor_health_check)
        return ready and (disable_predictor_health_check or not self._draining())

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        if getattr(model, "model_version", None):
            metadata["versions"] = [str(model.model_version)]
        metadata["platform"] = getattr(model, "platform", "") or ""
        return metadata


# -- REST: admission, deadlines, body limit, disconnects, catch-all ---------------------------------

def _json_response(status: int, content: dict, retry_after: int | None = None):
    from fastapi.responses import JSONResponse

    headers = {"retry-after": str(retry_after)} if retry_after else None
    return JSONResponse(status_code=status, content=content, headers=headers)


async def _send_json(send, status: int, content: dict, retry_after: int | None = None) -> None:
    payload = orjson.dumps(content)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """ASGI middleware in front of kserve's routes (inside its timing middleware).

    Inference requests (POST .../infer, :predict, :explain): header checks, admission, the deadline,
    the body read up to ``max_bytes`` (413 beyond, 400 when empty), the app run as a task that is
    cancelled when the client disconnects, the drain time runs out, or the deadline is long past.
    Every request: unexpected exceptions become a generic 500 with a request id, logged once.
    """

    def __init__(self, app, max_bytes: int, admission: Admission, default_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.admission = admission
        self.default_timeout_s = default_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(INFERENCE_PATH_SUFFIXES):
            return await self._serve(scope, receive, send)
        started, status = time.perf_counter(), [499]  # no answer sent: the client went away

        async def metered_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            return await self._serve(scope, receive, metered_send)
        finally:
            count_request("rest", status[0], time.perf_counter() - started)

    async def _serve(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "complete": False, "release": None}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
                if state["release"] is not None:
                    # Free the admission slot before the client can read the answer: a client that sends
                    # its next request at once must not find its own previous request still counted.
                    state["release"]()
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = request_id(headers.get("x-request-id"))
        try:
            check_request_id(headers.get("x-request-id"))
            if scope["path"].startswith(REPOSITORY_PATH):
                # No model-repository extension: nobody may load or unload the served model over the network.
                reject_count("control_plane")
                log_refusal(404, "control_plane", scope["path"][:100], f"request {rid}")
                return await _send_json(send, 404, {"error": "not found", "reason": "control_plane"})
            if scope["method"] == "POST" and scope["path"].endswith(INFERENCE_PATH_SUFFIXES):
                return await self._inference(scope, receive, tracked_send, headers, state)
            if scope["method"] == "POST":
                body = await self._read_body(scope, receive, headers)
                if body is None:
                    return
                return await self.app(scope, _replay(body, receive), tracked_send)
            return await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if state["started"]:
                log.exception("request %s failed after its response started", rid)
                return
            if _known(exc):
                status, _, reason, message, retry_after = describe(exc)
                log_refusal(status, reason, message, f"request {rid}")
                return await _send_json(send, status, {"error": message, "reason": reason}, retry_after)
            log.exception("internal error in request %s (%s %s)", rid, scope["method"], scope["path"])
            return await _send_json(send, 500, {"error": "internal error", "reason": "internal", "request_id": rid})

    async def _read_body(self, scope, receive, headers) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            reject_count("too_large")
            raise RequestRejected("too_large", f"the request body is {int(declared)} bytes; at most "
                                               f"{self.max_bytes} are accepted", 413)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                CANCELLED.inc()
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                reject_count("too_large")
                raise RequestRejected("too_large", f"the request body exceeds {self.max_bytes} bytes", 413)
            chunks.append(chunk)
            more = message.get("more_body", False)
        if size == 0 and scope["path"].endswith(INFERENCE_PATH_SUFFIXES):
            reject_count("empty")
            raise RequestRejected("empty", "the request body is empty")
        return b"".join(chunks)

    async def _inference(self, scope, receive, send, headers, state: dict) -> None:
        budget = timeout_from_headers(headers, self.default_timeout_s)
        me = asyncio.current_task()
        self.admission.enter(me)  # before the body is read: an overloaded server refuses at once
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.leave(me)

        state["release"] = release
        work = watch = None
        try:
            body = await self._read_body(scope, receive, headers)
            if body is None:
                return
            set_deadline(budget)  # the app task below inherits it
            work = asyncio.ensure_future(self.app(scope, _replay(body, None), send))
            self.admission.track(work)
            watch = asyncio.ensure_future(receive())  # completes when the client disconnects (or the reply ends)
            done, _ = await asyncio.wait({work, watch}, timeout=budget + DEADLINE_GRACE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done or state["complete"]:  # (a finished reply also ends the receive() wait)
                return await work
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            if watch in done:  # the client went away: its work is dropped
                CANCELLED.inc()
                return
            reject_count("deadline_exceeded")
            raise DeadlineExceeded("before the answer was ready")
        except asyncio.CancelledError:
            if work is not None and not work.done():
                work.cancel()
            if self.admission.draining and not state["started"]:
                # The drain time is up: a clean 503 rather than a dropped connection.
                with contextlib.suppress(Exception):
                    await _send_json(send, 503, {"error": ShuttingDown().message, "reason": "shutting_down"}, 1)
                return
            raise
        finally:
            if watch is not None:
                watch.cancel()
            release()


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that yields the buffered body once, then waits (or forwards to ``receive``)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is not None:
            return await receive()
        await asyncio.Event().wait()  # the guard watches the real connection; the app never needs it

    return replay


def _install_rest_handlers(app, admission: Admission) -> None:
    """Quiet, one-line handlers for every known error (kserve's log each at ERROR with a traceback)."""
    from fastapi.exceptions import RequestValidationError

    async def known(request, exc):
        status, _, reason, message, retry_after = describe(exc)
        log_refusal(status, reason, message, f"request {request_id(request.headers.get('x-request-id'))}")
        return _json_response(status, {"error": message, "reason": reason}, retry_after)

    async def invalid_request(request, exc: RequestValidationError):
        reject_count("invalid_request")
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))[:100]
        message = f"malformed request: {where}: {str(first.get('msg', ''))[:200]}"
        log_refusal(422, "invalid_request", message, f"request {request_id(request.headers.get('x-request-id'))}")
        return _json_response(422, {"error": message, "reason": "invalid_request"})

    for cls in (ServiceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, ServerNotLive,
                NotImplementedError):
        app.add_exception_handler(cls, known)
    app.add_exception_handler(RequestValidationError, invalid_request)


class _UvicornServer(_RefreshingServer):
    """Uvicorn that leaves SIGTERM/SIGINT to :class:`PneumoscopeModelServer` (which drains first)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class PneumoscopeRESTServer(RESTServer):
    def __init__(self, *args, admission: Admission, max_body_bytes: int, default_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._server = _UvicornServer(self.config)
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.default_timeout_s = default_timeout_s

    def create_application(self):
        super().create_application()
        from kserve.model_server import app

        _install_rest_handlers(app, self.admission)
        app.add_middleware(RequestGuard, max_bytes=self.max_body_bytes, admission=self.admission,
                           default_timeout_s=self.default_timeout_s)

    def stop(self) -> None:
        self._server.should_exit = True


# -- gRPC -------------------------------------------------------------------------------------------

def _status_name(context, default: str) -> str:
    """The gRPC status the handler set (an enum, or its integer in some grpc builds), else ``default``."""
    import grpc

    code = context.code()
    if code is None:
        return default
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)
    return getattr(code, "name", default)


class Servicer(InferenceServicer):
    """kserve's servicer without the repository extension, with admission, deadlines and quiet errors."""

    def __init__(self, data_plane: DataPlane, admission: Admission, default_timeout_s: float):
        super().__init__(data_plane, None)
        self.admission = admission
        self.default_timeout_s = default_timeout_s

    async def RepositoryModelLoad(self, request, context):
        await self._abort(context, "UNIMPLEMENTED", "the model repository extension is disabled on this server")

    async def RepositoryModelUnload(self, request, context):
        await self._abort(context, "UNIMPLEMENTED", "the model repository extension is disabled on this server")

    async def ModelInfer(self, request, context):
        started, code = time.perf_counter(), "UNKNOWN"
        try:
            reply = await self._model_infer(request, context)
            code = _status_name(context, "OK")
            return reply
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:  # context.abort() raises after setting the status
            code = _status_name(context, "UNKNOWN")
            raise
        finally:
            count_request("grpc", GRPC_TO_HTTP.get(code, 500), time.perf_counter() - started)

    async def _model_infer(self, request, context):
        metadata = dict(context.invocation_metadata() or ())
        rid = request_id(metadata.get("x-request-id"))
        task = asyncio.current_task()
        try:
            check_request_id(metadata.get("x-request-id"))
            self.admission.enter(task)
        except ServiceError as exc:
            return await self._refuse(context, exc, rid)
        try:
            left = context.time_remaining()
            set_deadline(self.default_timeout_s if left is None else min(left, self.default_timeout_s))
            model = self._data_plane.model_registry.get_model(request.model_name)
            if model is not None and hasattr(model, "precheck_grpc"):
                model.precheck_grpc(request)
            return await super().ModelInfer(request, context)
        except asyncio.CancelledError:
            if self.admission.draining and not context.cancelled():
                return await self._refuse(context, ShuttingDown(), rid)
            CANCELLED.inc()
            raise
        except Exception as exc:
            if _known(exc):
                return await self._refuse(context, exc, rid)
            log.exception("internal error in gRPC request %s", rid)
            await self._abort(context, "INTERNAL", f"internal error (request id {rid})")
        finally:
            self.admission.leave(task)

    async def _refuse(self, context, exc, rid: str):
        status, code, reason, message, _ = describe(exc)
        log_refusal(status, reason, message, f"gRPC request {rid}")
        await self._abort(context, code, message)

    @staticmethod
    async def _abort(context, code: str, message: str):
        import grpc

        await context.abort(getattr(grpc.StatusCode, code), message)


class _QuietErrors:
    """gRPC interceptor for the RPCs other than ModelInfer (metadata, readiness): known errors map to
    their status code with one INFO line; anything else is INTERNAL, logged once."""

    def __new__(cls):
        from grpc.aio import AbortError
        from grpc_interceptor import AsyncServerInterceptor

        class Interceptor(AsyncServerInterceptor):
            async def intercept(self, method, request, context, method_name):
                import grpc

                try:
                    return await method(request, context)
                except (asyncio.CancelledError, AbortError):
                    raise
                except Exception as exc:
                    if _known(exc):
                        status, code, reason, message, _ = describe(exc)
                        log_refusal(status, reason, message, f"gRPC {method_name}")
                        await context.abort(getattr(grpc.StatusCode, code), message)
                    rid = uuid.uuid4().hex
                    log.exception("internal error in gRPC %s (request id %s)", method_name, rid)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")

        return Interceptor()


class GRPCServer:
    """kserve's gRPC server setup with our servicer, limits and bind address."""

    def __init__(self, port: int, host: str, data_plane: DataPlane, admission: Admission, default_timeout_s: float,
                 max_receive_bytes: int, max_send_bytes: int):
        self.port, self.host = port, host
        self.servicer = Servicer(data_plane, admission, default_timeout_s)
        self.admission = admission
        self.max_receive_bytes, self.max_send_bytes = max_receive_bytes, max_send_bytes
        self._server = None

    async def start(self, max_workers: int):
        from concurrent import futures

        from grpc import aio
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=(_QuietErrors(),),
            # gRPC's own bound counts every RPC (health checks too): leave room above the inference limit,
            # which the servicer enforces with a clear message.
            maximum_concurrent_rpcs=2 * self.admission.limit + 16,
            options=[("grpc.max_send_message_length", self.max_send_bytes),
                     ("grpc.max_receive_message_length", self.max_receive_bytes)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self._server)
        self._server.add_insecure_port(f"{self.host}:{self.port}")
        log.info("gRPC server on %s:%s (messages up to %d bytes in, %d out)", self.host, self.port,
                 self.max_receive_bytes, self.max_send_bytes)
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace=grace_s)


# -- the model server -------------------------------------------------------------------------------

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

    def __init__(self, *, max_request_bytes: int, max_response_bytes: int, max_inflight: int,
                 default_timeout_s: float, drain_timeout_s: float, access_log: bool = False, bind: str = "0.0.0.0",
                 **kwargs):
        check_workers(kwargs.get("workers", 1))
        self.bind = bind
        self.max_request_bytes, self.max_response_bytes = max_request_bytes, max_response_bytes
        self.default_timeout_s, self.drain_timeout_s = default_timeout_s, drain_timeout_s
        self.admission = Admission(max_inflight)
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
                                    max_response_bytes=max_response_bytes, max_inflight=settings.inflight_limit(),
                                    default_timeout_s=settings.request_timeout_s,
                                    drain_timeout_s=settings.drain_timeout_s, access_log=settings.access_log,
                                    bind=args.bind)
    server.start([model])
    return 0
