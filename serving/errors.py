"""The errors the servers answer with, and how each maps to REST and gRPC.

Every refusal is a :class:`ServiceError`: an HTTP status, a gRPC status code, a short ``reason`` (a
metric label), and a one-line message fit for the client (no addresses, no object reprs, no
tracebacks). The REST and gRPC servers answer them and log each once, without a traceback
(:mod:`serving.refusals`); anything else becomes a generic 500 / INTERNAL with a request id.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the server answers with an error of its own choosing."""

    status = 500
    grpc_code = "INTERNAL"
    retry_after: int | None = None

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)

    @property
    def code(self) -> str:  # the metric label (kept for callers that read ``.code``)
        return self.reason


class RequestRejected(ServiceError):
    """The client's request is unusable (4xx / INVALID_ARGUMENT): ``code`` is the metric label."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(code, message)
        self.status = status


class PredictorUnavailable(ServiceError):
    """The predictor did not answer (down, restarting, overloaded, shutting down): 503, retry later."""

    status = 503
    grpc_code = "UNAVAILABLE"
    retry_after = 1

    def __init__(self, detail: str = ""):
        # The detail (addresses, gRPC debug strings) goes to the log, never to the client.
        super().__init__("predictor_unavailable", "the predictor is unavailable; retry shortly")
        self.detail = detail


class Overloaded(ServiceError):
    """More requests in flight than this process takes: refused at once, 503 / RESOURCE_EXHAUSTED."""

    status = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    retry_after = 1

    def __init__(self, limit: int, budget_s: float | None = None, deadline_s: float | None = None,
                 expected_s: float | None = None):
        if expected_s is not None and deadline_s is not None:
            message = (f"the server expects to answer in about {expected_s * 1000:.0f} ms, after this request's "
                       f"deadline of {deadline_s * 1000:.0f} ms; retry shortly")
        elif budget_s is not None:
            message = (f"the server is at its limit of {limit} requests in flight (what it answers within its "
                       f"latency budget of {budget_s * 1000:.0f} ms); retry shortly")
        else:
            message = f"the server is at its limit of {limit} requests in flight; retry shortly"
        super().__init__("overloaded", message)


class ShuttingDown(ServiceError):
    """The process is draining before it exits: 503 / UNAVAILABLE, another replica will answer."""

    status = 503
    grpc_code = "UNAVAILABLE"
    retry_after = 1

    def __init__(self):
        super().__init__("shutting_down", "the server is shutting down; retry on another replica")


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its work could finish: 504 / DEADLINE_EXCEEDED."""

    status = 504
    grpc_code = "DEADLINE_EXCEEDED"

    def __init__(self, where: str = "in the queue"):
        super().__init__("deadline_exceeded", f"the request's deadline passed {where}")
