"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from server.api.deps import ServicesDep, metrics_reader
from server.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])
# Anyone may ask /readyz: a flood of it makes at most a few engine health checks a second.
READY_CHECK_REUSE = 0.25


@router.get("/healthz")
def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready to serve: an engine answers, the database and the registry are usable, not draining."""
    engine, database, registry = await asyncio.gather(
        services.pool.healthy(reuse=READY_CHECK_REUSE), _check(services.store.ping),
        _check(_registry_writable, services),
    )
    checks = {"engine": engine, "database": database, "registry": registry, "draining": services.draining}
    ready = engine and database and registry and not services.draining
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_reader)])
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format, for the metrics token or an admin key only (it names every tenant).
    `loraserve_engine_up` is what the pool's background health check last saw: a scrape sends nothing
    to the engines, so scraping (or being refused) never fans out to them."""
    body = await run_in_threadpool(services.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


async def _check(fn, *args) -> bool:
    try:
        await run_in_threadpool(fn, *args)
    except Exception:
        return False
    return True


def _registry_writable(services) -> None:
    if not os.access(services.registry.staging, os.W_OK):
        raise OSError("registry is not writable")
