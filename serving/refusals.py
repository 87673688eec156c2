"""How a refusal is described and logged, the same for REST and gRPC.

Every refusal is a :class:`~serving.errors.ServiceError` or one of kserve's own errors
(:data:`KNOWN_ERRORS`): :func:`describe` gives its HTTP status, gRPC code, reason (a metric label) and
one-line message, and :func:`log_refusal` logs it once, at INFO/WARNING, without a traceback. Anything
else is not a refusal: the REST and gRPC servers answer it with a generic 500 / INTERNAL carrying a
request id (:func:`request_id`), logged once with its traceback.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady

from serving.errors import RequestRejected, ServiceError
from serving.metrics import reject_count

log = logging.getLogger("pneumoscope.serving")

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe in logs and gRPC metadata
#: The errors that are refusals (answered with their own status, logged without a traceback).
KNOWN_ERRORS = (ServiceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady, ServerNotLive,
                NotImplementedError)


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


def is_known(exc: BaseException) -> bool:
    return isinstance(exc, KNOWN_ERRORS)


#: Refusals of load (admission) come by the thousand per second under overload: one line per reason and interval
#: says it (with the count), the metrics count every one.
SUMMARISED_REASONS = ("overloaded",)
SUMMARY_INTERVAL_S = 10.0
_summaries: dict[str, list] = {}  # reason -> [first refusal time of the interval, refusals not logged yet]


def log_refusal(status: int, reason: str, message: str, where: str) -> None:
    """Each refusal once, without a traceback: INFO for the client's mistakes, WARNING for ours (DEBUG for
    readiness probes answered "not ready", which the kubelet asks every few seconds). Load refusals
    (:data:`SUMMARISED_REASONS`) are logged once per :data:`SUMMARY_INTERVAL_S`, with the number refused since."""
    level = logging.DEBUG if reason == "not_ready" else logging.INFO if status < 500 else logging.WARNING
    if reason in SUMMARISED_REASONS:
        now = time.monotonic()
        started, pending = _summaries.get(reason, (None, 0))
        if started is not None and now - started < SUMMARY_INTERVAL_S:
            _summaries[reason] = [started, pending + 1]
            return
        _summaries[reason] = [now, 0]
        if pending:
            message = f"{message} ({pending} more refused in the last {now - started:.0f} s, not logged one by one)"
    log.log(level, "%s refused (%d %s): %s", where, status, reason, message[:400])


def request_id(value: str | None) -> str:
    """The client's x-request-id when it is well-formed, otherwise a fresh one."""
    return value if value and _REQUEST_ID.match(value) else uuid.uuid4().hex


def check_request_id(value: str | None) -> None:
    if value is not None and not _REQUEST_ID.match(value):
        reject_count("invalid_header")
        raise RequestRejected("invalid_header", "x-request-id must be 1-128 printable ASCII characters")
