"""Errors the servers turn into 4xx/503 answers (REST) and INVALID_ARGUMENT/UNAVAILABLE (gRPC).

Both classes derive from kserve's own error types, so kserve's gRPC interceptor maps them to the
right status codes; :func:`install_handlers` adds REST handlers that keep our status and reason.
"""

from __future__ import annotations

from kserve.errors import InvalidInput, ModelNotReady


class RequestRejected(InvalidInput):
    """A request we refuse: ``code`` is a short metric label, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.status = status


class PredictorUnavailable(ModelNotReady):
    """The predictor did not answer (down, restarting, overloaded): 503, the client may retry."""

    def __init__(self, model_name: str, detail: str):
        super().__init__(model_name, detail)
        # kserve's gRPC interceptor reads ``.reason``; ModelNotReady does not set it.
        self.reason = f"predictor unavailable: {detail}"

    def __str__(self) -> str:
        return self.reason


def install_handlers(app) -> None:
    """REST handlers for our errors (more specific than kserve's, so they win)."""
    from fastapi.responses import JSONResponse

    async def rejected(_, exc: RequestRejected):
        return JSONResponse(status_code=exc.status, content={"error": str(exc), "reason": exc.code})

    async def unavailable(_, exc: PredictorUnavailable):
        return JSONResponse(status_code=503, content={"error": str(exc), "reason": "predictor_unavailable"},
                              headers={"retry-after": "1"})

    app.add_exception_handler(RequestRejected, rejected)
    app.add_exception_handler(PredictorUnavailable, unavailable)
