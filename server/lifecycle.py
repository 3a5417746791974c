"""Adapter lifecycle across the registry, the database and the engines: publish with hot load,
activate (roll back or forward), delete. Each step keeps the three consistent for running traffic:

- a new version is loaded on an engine *before* it becomes active, so the first request after the
  upload's response is not a cold start, and an adapter the engine cannot load is never activated;
- the version it replaces is retired: unloaded once the requests running on it have finished;
- a deleted name is gone from the database first (404 at once), then from disk, then from the engines.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from adapters.names import engine_name
from adapters.registry import PublishedVersion
from server.engine.client import AdapterLoadFailed
from server.errors import EngineUnavailable, Unprocessable
from server.services import Services
from server.training import files_dir

log = logging.getLogger("loraserve.lifecycle")


async def publish(services: Services, source: Path, tenant: str, name: str, origin: str) -> PublishedVersion:
    published = await run_in_threadpool(
        services.registry.publish, source, tenant, name, origin=origin, activate=False
    )
    model = engine_name(tenant, name, published.version)
    try:
        await services.pool.preload(model, str(published.path))
    except EngineUnavailable as exc:
        if not isinstance(exc.__cause__, AdapterLoadFailed):
            log.warning("engine unavailable; %s will load on first use", model)
        else:
            await run_in_threadpool(_discard, services, tenant, name, published.version)
            raise Unprocessable(
                "The inference engine could not load this adapter; it was not published.", code="invalid_adapter"
            ) from exc
    await activate(services, tenant, name, published.version, warm=False)
    return published


async def activate(services: Services, tenant: str, name: str, version: int, *, warm: bool = True) -> None:
    """Make `version` the one `NAME` serves (roll back or forward) and retire the one it replaces."""
    previous = await run_in_threadpool(services.store.activate, tenant, name, version)
    if warm:  # load it now, so the switch does not cost the next request a load
        model, path = engine_name(tenant, name, version), services.registry.version_path(tenant, name, version)
        try:
            await services.pool.preload(model, str(path))
        except EngineUnavailable:
            log.warning("could not preload %s; it will load on first use", model)
    if previous is not None and previous != version:
        services.pool.retire([engine_name(tenant, name, previous)])


async def delete_version(services: Services, tenant: str, name: str, version: int) -> None:
    await run_in_threadpool(services.store.delete_version, tenant, name, version)
    await run_in_threadpool(services.registry.remove, tenant, name, version)
    services.pool.retire([engine_name(tenant, name, version)])


async def delete_adapter(services: Services, tenant: str, name: str) -> None:
    versions = await run_in_threadpool(services.store.delete_adapter, tenant, name)
    await run_in_threadpool(services.registry.remove, tenant, name)
    services.pool.retire(engine_name(tenant, name, v) for v in versions)


async def delete_tenant(services: Services, tenant: str) -> None:
    """The tenant's keys, adapters, files and jobs go with it (the database cascades the rows)."""
    gone = await run_in_threadpool(services.store.delete_tenant, tenant)
    await run_in_threadpool(services.registry.remove, tenant)
    await run_in_threadpool(shutil.rmtree, files_dir(services.settings, tenant), True)
    services.pool.retire(engine_name(tenant, name, v) for name, v in gone)


def _discard(services: Services, tenant: str, name: str, version: int) -> None:
    """Undo a publish whose version never became active."""
    adapter = services.store.get_adapter(tenant, name)
    if adapter and adapter.versions == (version,):
        services.store.delete_adapter(tenant, name)
        services.registry.remove(tenant, name)
    else:
        services.store.delete_version(tenant, name, version)
        services.registry.remove(tenant, name, version)
