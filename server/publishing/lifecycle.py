"""Adapter lifecycle across the registry, the database and the engines: publish with hot load,
activate (roll back or forward), delete. Each step keeps the three consistent for running traffic:

- a new version is loaded on an engine *before* it becomes active, so the first request after the
  upload's response is not a cold start, and an adapter the engine cannot load is never activated;
  where the adapter has a golden set, the version is evaluated there first and its promotion policy decides
  whether it becomes active (`promotion`);
  where no engine could try it, it is active `unverified` and its first load decides (`engine_verdict`;
  the rule is in `adapters.registry`);
- the version it replaces is retired: unloaded once the requests running on it have finished;
- a deleted name is gone from the database first (404 at once), then from the engines once idle, then
  from disk: requests still running on it need its files.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from adapters.names import engine_name
from adapters.registry import PublishedVersion
from server.engine.client import AdapterLoadFailed
from server.errors import EngineUnavailable, Unprocessable
from server.finetuning.training import files_dir
from server.publishing import promotion
from server.storage.store import Store

if TYPE_CHECKING:  # the composition root, above this package: only its type
    from server.services import Services

log = logging.getLogger("loraserve.lifecycle")


async def publish(services: Services, source: Path, tenant: str, name: str, origin: str,
                  activate: bool = True) -> PublishedVersion:
    """Publish, load and evaluate a new version; then its promotion policy decides whether it becomes active, or,
    with `activate` false, it stays published only (for `NAME@N` or a canary)."""
    published = await run_in_threadpool(
        services.registry.publish, source, tenant, name, origin=origin, activate=False
    )
    model = engine_name(tenant, name, published.version)
    try:
        await services.pool.preload(model, str(published.path))  # verifies it (`engine_verdict`)
    except EngineUnavailable as exc:
        if not isinstance(exc.__cause__, AdapterLoadFailed):
            log.warning("engine unavailable; %s is active unverified, its first load decides", model)
        else:
            await run_in_threadpool(_discard, services, tenant, name, published.version)
            raise Unprocessable(
                "The inference engine could not load this adapter; it was not published.", code="invalid_adapter"
            ) from exc
    # Where the adapter has a golden set the version is evaluated first, and its promotion policy decides.
    report = await promotion.evaluate(services, tenant, name, published.version)
    if activate:
        await promotion.promote(services, tenant, name, published.version, report, origin)
        return published
    if report is not None:
        await run_in_threadpool(services.store.save_evaluation, tenant, name, published.version, report)
    services.pool.retire([model])  # loaded again by its first request
    return published


async def activate(services: Services, tenant: str, name: str, version: int, *, warm: bool = True) -> None:
    """Make `version` the one `NAME` serves (roll back or forward) and retire the one it replaces."""
    previous = await run_in_threadpool(services.store.activate, tenant, name, version)
    if warm:  # load it now, so the switch does not cost the next request a load
        model, path = engine_name(tenant, name, version), services.registry.version_path(tenant, name, version)
        try:
            await services.pool.preload(model, str(path))
        except EngineUnavailable as exc:
            if isinstance(exc.__cause__, AdapterLoadFailed):  # an unverified version, refused: fell back
                raise Unprocessable(f"The inference engine could not load version {version}; it was not made "
                                    "active.", code="invalid_adapter") from exc
            log.warning("could not preload %s; it will load on first use", model)
    if previous is not None and previous != version:
        services.pool.retire([engine_name(tenant, name, previous)])


async def delete_version(services: Services, tenant: str, name: str, version: int) -> None:
    await run_in_threadpool(services.store.delete_version, tenant, name, version)
    await _drop_versions(services, tenant, [(name, version)])


async def delete_adapter(services: Services, tenant: str, name: str) -> None:
    versions = await run_in_threadpool(services.store.delete_adapter, tenant, name)
    await _drop_versions(services, tenant, [(name, v) for v in versions])


async def delete_tenant(services: Services, tenant: str) -> None:
    """The tenant's keys, adapters, files and jobs go with it (the database cascades the rows)."""
    gone = await run_in_threadpool(services.store.delete_tenant, tenant)
    await run_in_threadpool(shutil.rmtree, files_dir(services.settings, tenant), True)
    await _drop_versions(services, tenant, gone)


async def _drop_versions(services: Services, tenant: str, versions: list[tuple[str, int]]) -> None:
    """Deleted versions (already gone from the database: 404 at once) leave the engines once idle, and
    their folders only after that: requests still running on one need its files (`EnginePool.discard`)."""
    registry = services.registry
    await run_in_threadpool(lambda: [registry.mark_deleted(tenant, name, v) for name, v in versions])
    await asyncio.gather(*(
        services.pool.discard(engine_name(tenant, name, v), functools.partial(registry.remove, tenant, name, v))
        for name, v in versions
    ))


async def engine_verdict(store: Store, engine_model: str, loaded: bool) -> None:
    """An engine loaded `engine_model` for the first time, or refused to: the verification of an
    unverified version. Refused: the version is `refused`, the adapter falls back (`Store.refuse_version`)
    and the audit log says so. Never raises: it runs inside the engine pool's load."""
    parts = engine_model.split("--")
    if len(parts) != 3 or not parts[2].startswith("v") or not parts[2][1:].isdecimal():
        return  # not a tenant's adapter (the zero adapter)
    tenant, name, version = parts[0], parts[1], int(parts[2][1:])
    try:
        if loaded:
            if await run_in_threadpool(store.mark_verified, tenant, name, version):
                log.info("%s/%s version %s verified by its first load", tenant, name, version)
            return
        outcome = await run_in_threadpool(store.refuse_version, tenant, name, version)
        if outcome is None:
            return
        was_active, now = outcome
        detail = (f"the engine refused the unverified version; active version now {now}" if was_active
                  else "the engine refused the unverified version; it was not active")
        log.error("%s/%s version %s: %s", tenant, name, version, detail)
        await run_in_threadpool(store.audit, "engine", "adapter.verify", f"{tenant}/{name}@{version}", "refused",
                                detail)
    except Exception:
        log.exception("could not record the engine's verdict on %s", engine_model)


def _discard(services: Services, tenant: str, name: str, version: int) -> None:
    """Undo a publish whose version never became active."""
    adapter = services.store.get_adapter(tenant, name)
    if adapter and adapter.versions == (version,):
        services.store.delete_adapter(tenant, name)
        services.registry.remove(tenant, name)
    else:
        services.store.delete_version(tenant, name, version)
        services.registry.remove(tenant, name, version)
