"""The gateway application: `create_app(settings)`, its lifespan, routers, and the one place where
exceptions become HTTP responses."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from server.api.access_log import AccessLog
from server.api.body_limit import BodySizeLimit
from server.api.early_auth import AuthBeforeBody
from server.api.routes import adapters, admin, admin_jobs, files, fine_tuning, health, openai, traffic
from server.api.unhandled import UnhandledErrors
from server.config import Settings
from server.console import routes as console
from server.errors import APIError, api_error_body, as_api_error, domain_errors, error_body
from server.publishing import promotion
from server.services import Services
from server.wire.openai import ErrorResponse

log = logging.getLogger("loraserve.app")
PROMOTION_POLL_SECONDS = 2.0  # how soon a job's version waiting for its evaluation is taken up


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = services or Services.build(settings)
        svc.registry.prepare()
        await run_in_threadpool(svc.prepare_base_stand_in)
        app.state.services = svc
        for child in svc.children():
            child.start()
        shared_limits = svc.limiter.shared
        if shared_limits is not None:
            await shared_limits.beat()  # counted by the other gateways before the first request
        watchers = [asyncio.create_task(svc.pool.watch(settings.engine_health_interval)),
                    asyncio.create_task(promotion.watch_promotions(svc, PROMOTION_POLL_SECONDS)),
                    asyncio.create_task(svc.traffic.watch())]
        if shared_limits is not None:
            watchers.append(asyncio.create_task(shared_limits.watch()))
        try:
            yield
        finally:
            svc.draining = True
            for watch in watchers:
                watch.cancel()
            for child in svc.children():
                await child.stop()
            await svc.pool.aclose()
            if shared_limits is not None:
                await shared_limits.aclose()

    app = FastAPI(title="loraserve", version="0.1.0", lifespan=lifespan)
    # Document the one error shape on every API route (clients and schema fuzzers read it).
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 503)}
    for router in (openai.router, files.router, fine_tuning.router, adapters.router, admin.router,
                   admin_jobs.router, traffic.router):
        app.include_router(router, responses=errors)
    app.include_router(health.router)
    if settings.console:
        app.include_router(console.router)
    app.add_middleware(BodySizeLimit, default=settings.max_request_bytes, uploads=settings.max_upload_bytes)
    app.add_middleware(AuthBeforeBody)  # outside the size limit: no key, no byte of the body read
    app.add_middleware(AccessLog)  # sees every response, the 401s and 413s above included
    app.add_middleware(UnhandledErrors)  # outermost of ours: an unexpected error is one 500, nothing more
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    def rejected(request: Request, reason: str) -> None:
        services = getattr(request.app.state, "services", None)
        if services is not None:
            services.metrics.rejected(reason)

    async def known_error(request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        rejected(request, error.reason)
        return JSONResponse(api_error_body(error), status_code=error.status, headers=error.headers())

    for kind in (APIError, *domain_errors()):
        app.add_exception_handler(kind, known_error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        rejected(request, "validation")
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header", "path")]
        param = ".".join(loc) or None
        message = first.get("msg", "Invalid request.")
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif first.get("type") == "extra_forbidden":
            message = f"{param}: this server does not accept this field."
        elif param:
            message = f"{param}: {message}"
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        rejected(request, "not_found" if exc.status_code == 404 else "validation")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(message, "invalid_request_error", code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # Unexpected exceptions: server.api.unhandled.UnhandledErrors (Starlette's handler for them re-raises).
