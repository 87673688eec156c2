"""The gRPC server: kserve's servicer without the repository extension, with admission and quiet errors.

- **No control plane**: ``RepositoryModelLoad/Unload`` answer UNIMPLEMENTED.
- **Admission** (one :class:`~serving.admission.Admission`, shared with the REST server): ``ModelInfer``
  calls that can be answered within the latency budget (and their own deadline); the rest are refused at
  once with RESOURCE_EXHAUSTED -- when the call starts, before its message is parsed
  (:func:`_early_refusal`), and again by the servicer, which knows the call's deadline. Every call runs
  under the smaller of the client's deadline and ``default_timeout_s``.
- **Message sizes**: gRPC's own receive and send limits, per hop and role.
- **Errors**: refusals are answered and logged by :mod:`serving.refusals`; anything unexpected becomes
  INTERNAL carrying a request id, logged once with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.servicer import InferenceServicer

from serving.admission import Admission, set_deadline
from serving.errors import ServiceError, ShuttingDown
from serving.metrics import CANCELLED, GRPC_TO_HTTP, count_request, reject_count
from serving.refusals import check_request_id, describe, is_known, log_refusal, request_id

log = logging.getLogger("pneumoscope.serving")


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
        left = context.time_remaining()
        budget = self.default_timeout_s if left is None else min(left, self.default_timeout_s)
        try:
            check_request_id(metadata.get("x-request-id"))
            self.admission.enter(task, budget)
        except ServiceError as exc:
            return await self._refuse(context, exc, rid)
        try:
            set_deadline(budget)
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
            if is_known(exc):
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
                    if is_known(exc):
                        status, code, reason, message, _ = describe(exc)
                        log_refusal(status, reason, message, f"gRPC {method_name}")
                        await context.abort(getattr(grpc.StatusCode, code), message)
                    rid = uuid.uuid4().hex
                    log.exception("internal error in gRPC %s (request id %s)", method_name, rid)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")

        return Interceptor()


def _early_refusal(admission: Admission):
    """A gRPC interceptor that refuses ``ModelInfer`` when the call starts, before its message is read into a
    protobuf: a refusal then costs no parsing of a message of megabytes (the servicer refuses again, with the
    call's deadline, what slips through)."""
    import grpc

    class EarlyRefusal(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            refused = admission.refusal() if details.method.endswith("/ModelInfer") else None
            if refused is None:
                return await continuation(details)
            started = time.perf_counter()
            reject_count(refused.reason)
            status, code, reason, message, _ = describe(refused)
            rid = request_id(dict(details.invocation_metadata or ()).get("x-request-id"))

            async def refuse(request, context):
                log_refusal(status, reason, message, f"gRPC request {rid}")
                count_request("grpc", GRPC_TO_HTTP[code], time.perf_counter() - started)
                await context.abort(getattr(grpc.StatusCode, code), message)

            return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=lambda data: None)

    return EarlyRefusal()


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
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(_early_refusal(self.admission), _QuietErrors()),
            # gRPC's own bound counts every RPC (health checks too): leave room above the inference bound,
            # which admission enforces with a clear message.
            maximum_concurrent_rpcs=2 * self.admission.max_inflight + 16,
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
