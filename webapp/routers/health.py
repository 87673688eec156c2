"""Probes and metrics: the only routes that need no sign-in."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webapp.db import check_ready

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the process is alive")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="the database answers and its schema is current")
async def readyz(request: Request):
    ready, why = await asyncio.to_thread(check_ready, request.app.state.ctx.engine)
    return JSONResponse({"status": "ready" if ready else "not ready", "detail": why},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
