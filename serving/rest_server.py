"""The REST server: kserve's RESTServer behind :class:`RequestGuard`, with quiet error handlers.

- **No control plane**: KServe's model-repository extension (``/v2/repository/...`` load/unload) is
  refused with 404 before it reaches kserve's routes; kserve 0.21 has no switch for it (its RESTServer
  always registers the routes).
- **Admission** (one :class:`~serving.admission.Admission`, shared with the gRPC server): what can be
  answered within the latency budget, decided from the headers alone; the rest is refused at once with
  503 + Retry-After, before its body is read; every request runs under a deadline; a client that
  disconnects has its work cancelled.
- **Body size**: at most ``max_body_bytes`` are read (413 beyond).
- **Errors**: refusals are answered and logged by :mod:`serving.refusals`; anything unexpected becomes
  a generic 500 carrying a request id, logged once with its traceback.
- **Signals** are left to :class:`~serving.model_server.PneumoscopeModelServer`, which drains first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson
from kserve.protocol.rest.server import RESTServer, _RefreshingServer

from serving.admission import Admission, set_deadline, timeout_from_headers
from serving.errors import DeadlineExceeded, RequestRejected, ShuttingDown
from serving.metrics import CANCELLED, count_request, reject_count
from serving.refusals import KNOWN_ERRORS, check_request_id, describe, is_known, log_refusal, request_id

log = logging.getLogger("pneumoscope.serving")

INFERENCE_PATH_SUFFIXES = (":predict", ":explain", "/infer")
REPOSITORY_PATH = "/v2/repository"
#: Seconds a request may overrun its deadline (decoding is not interruptible) before it is cut off with 504.
DEADLINE_GRACE_S = 2.0


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
            if is_known(exc):
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
        self.admission.enter(me, budget)  # before the body is read: an overloaded server refuses at once
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

    for cls in KNOWN_ERRORS:
        app.add_exception_handler(cls, known)
    app.add_exception_handler(RequestValidationError, invalid_request)


class _UvicornServer(_RefreshingServer):
    """Uvicorn that leaves SIGTERM/SIGINT to :class:`~serving.model_server.PneumoscopeModelServer`, which
    drains first."""

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
