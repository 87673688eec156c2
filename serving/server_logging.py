"""Logging for the servers: our loggers in kserve's format, and none of kserve's per-request lines."""

from __future__ import annotations

import logging


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
