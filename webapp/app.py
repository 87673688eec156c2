"""The FastAPI application: services built once per process in the lifespan, routers per resource.

``create_app(settings)`` is what ``pneumoscope web`` (uvicorn) and the tests run. At start it applies
the Alembic migrations, opens the image store and the transformer client, and starts the retry
worker that scores pending studies (including those left pending before a restart).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from webapp import db as database
from webapp.errors import AppError, NotAuthenticated
from webapp.inference import InferenceClient
from webapp.metrics import MetricsMiddleware
from webapp.settings import WebSettings
from webapp.storage import ImageStore, StorageError
from webapp.studies import RetryWorker, StudyService
from webapp.uploads import UploadRejected

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(PACKAGE / "templates"))
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}


class SecurityHeaders:
    """Pure ASGI: security headers on every answer; no caching of anything but static files (PHI)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                if not static and b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_wrapper)


@dataclass
class AppContext:
    settings: WebSettings
    engine: Engine
    factory: sessionmaker[Session]
    store: ImageStore
    client: InferenceClient
    service: StudyService
    secret_key: str
    templates: Jinja2Templates = TEMPLATES


def build_context(settings: WebSettings) -> AppContext:
    engine = database.make_engine(settings.resolved_database_url())
    database.upgrade(engine)
    store = ImageStore(settings.resolved_image_store())
    store.check()
    client = InferenceClient(settings.inference_url, settings.model_name, settings.inference_timeout_s,
                             settings.inference_host)
    factory = database.session_factory(engine)
    service = StudyService(settings, factory, store, client, settings.field_cipher())  # a bad key fails at start
    return AppContext(settings, engine, factory, store, client, service, settings.resolved_secret_key())


def create_app(settings: WebSettings | None = None, start_worker: bool = True) -> FastAPI:
    settings = settings or WebSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.ctx = context = build_context(settings)
        worker = RetryWorker(context.service)
        app.state.worker = worker
        if start_worker:
            worker.start()
        log.info("web app ready: database %s, images %s, transformer %s", context.engine.url.render_as_string(),
                 context.store.url, settings.inference_url)
        try:
            yield
        finally:
            await worker.stop()
            await context.client.aclose()
            context.engine.dispose()

    from webapp.routers import admin, auth, health, pages, reading_api, studies_api

    app = FastAPI(title="pneumoscope", version="1", lifespan=lifespan,
                  description="The doctor's app: upload a chest X-ray, see the probability of pneumonia and the "
                              "heatmap, keep studies, give feedback. API calls take `Authorization: Bearer "
                              "<token>` (`pneumoscope users token NAME`).",
                  docs_url=None, redoc_url=None)  # Swagger UI loads scripts from a CDN; the CSP forbids it
    app.add_middleware(SecurityHeaders)
    app.add_middleware(MetricsMiddleware)

    app.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    for router in (health.router, auth.router, studies_api.router, reading_api.router, pages.router, admin.router):
        app.include_router(router)
    install_error_handlers(app)
    return app


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def error_response(request: Request, status: int, message: str, code: str, headers: dict | None = None):
    if wants_json(request):
        return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)
    context = getattr(request.app.state, "ctx", None)
    templates = context.templates if context else TEMPLATES
    return templates.TemplateResponse(request, "error.html", {"status": status, "message": message, "user": None},
                                      status_code=status, headers={k: v for k, v in (headers or {}).items()
                                                                   if k != "www-authenticate"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated):
        if wants_json(request):
            return error_response(request, 401, str(exc), exc.code, exc.headers)
        from urllib.parse import quote

        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?reason={exc.reason}&next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError):
        return error_response(request, exc.status, str(exc), exc.code, exc.headers)

    @app.exception_handler(UploadRejected)
    async def upload_rejected(request: Request, exc: UploadRejected):
        # Too large: close the connection, or the server would go on reading (and discarding) the rest.
        headers = {"connection": "close"} if exc.code == "too_large" else None
        return error_response(request, exc.status, str(exc), exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                             for e in exc.errors())
        return error_response(request, 422, f"invalid request: {problems}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = "not found"
        return error_response(request, exc.status_code, message, "http_error", dict(exc.headers or {}))

    async def database_down(request: Request, exc: Exception):
        log.error("database error: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return error_response(request, 503, "the database is not reachable; try again shortly", "unavailable",
                              {"retry-after": "5"})

    # Down, restarting, refusing connections, full, or out of pooled connections: the request can succeed later.
    for unavailable in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, database_down)

    @app.exception_handler(DataError)
    async def value_the_database_refuses(request: Request, exc: DataError):
        # The client's value, not the server: PostgreSQL refuses text with a NUL character (SQLite stores it) and
        # numbers out of a column's range. The value itself is not logged (it may be a patient's).
        log.info("database refused a value on %s %s: %s", request.method, request.url.path, type(exc.orig).__name__)
        return error_response(request, 422, "invalid request: a value the database cannot store (text with a NUL "
                              "character, or a number out of range)", "invalid_request")

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError):
        if exc.connection_invalidated:  # the connection broke under the statement: as unreachable
            return await database_down(request, exc)
        log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal error", "internal")

    @app.exception_handler(StorageError)
    async def storage_down(request: Request, exc: StorageError):
        log.error("image store error: %s", exc)
        return error_response(request, 503, "the image store is not reachable; try again shortly", "unavailable",
                              {"retry-after": "5"})
