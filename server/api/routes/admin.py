"""Admin API (admin key only): tenants, their keys and adapters, and the audit log.

Every action is written to the audit log with the acting key's id, whether it succeeded or not.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adapters.names import check_name
from server.api.deps import AdminDep, ServicesDep
from server.api.paging import AdminLimit, After
from server.api.routes.adapters import ReportFormat, report_response
from server.errors import as_api_error
from server.evaluation import runs
from server.publishing import canary, lifecycle
from server.publishing.uploads import quota_error, staged_upload
from server.services import Services
from server.storage.store import KeyIdentity, OverQuota
from server.wire.openai import (
    ActivateRequest,
    AdapterOut,
    AdapterUpdate,
    AuditOut,
    CanaryRequest,
    KeyOut,
    TenantCreate,
    TenantLimits,
    TenantOut,
    TenantUpdate,
)
from server.wire.pages import Page

router = APIRouter(prefix="/admin", tags=["admin"])


@asynccontextmanager
async def audited(services: Services, admin: KeyIdentity, action: str, obj: str, detail: str | None = None):
    """Record the action and how it ended (`ok`, with `detail`, or the HTTP status it was refused with)."""
    try:
        yield
    except Exception as exc:
        error = as_api_error(exc)
        result, detail = (f"refused {error.status}", error.message) if error else ("failed", type(exc).__name__)
        await run_in_threadpool(services.store.audit, admin.key_id, action, obj, result, detail)
        raise
    await run_in_threadpool(services.store.audit, admin.key_id, action, obj, "ok", detail)


def _tenant_out(tenant) -> TenantOut:
    return TenantOut(id=tenant.id, default_adapter=tenant.default_adapter,
                     limits=TenantLimits(**(tenant.limits or {})), created_at=tenant.created_at)


# Tenants


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, admin: AdminDep, services: ServicesDep) -> TenantOut:
    async with audited(services, admin, "tenant.create", body.id):
        limits = body.limits.model_dump(exclude_none=True)
        return _tenant_out(await run_in_threadpool(services.store.create_tenant, body.id, limits))


@router.get("/tenants")
def list_tenants(_: AdminDep, services: ServicesDep, limit: AdminLimit = 100, after: After = None) -> Page[TenantOut]:
    tenants, more = services.store.tenant_page(limit, after)
    return Page.of([_tenant_out(t) for t in tenants], more)


@router.get("/tenants/{tenant}")
def get_tenant(tenant: str, _: AdminDep, services: ServicesDep) -> TenantOut:
    return _tenant_out(services.store.require_tenant(check_name(tenant, "tenant")))


@router.patch("/tenants/{tenant}")
async def update_tenant(tenant: str, body: TenantUpdate, admin: AdminDep, services: ServicesDep) -> TenantOut:
    async with audited(services, admin, "tenant.update", tenant):
        changes = {}
        if "default_adapter" in body.model_fields_set:
            changes["default_adapter"] = body.default_adapter
        if body.limits is not None:
            changes["limits"] = body.limits.model_dump(exclude_none=True)
        return _tenant_out(await run_in_threadpool(services.store.update_tenant, check_name(tenant, "tenant"),
                                                   **changes))


@router.delete("/tenants/{tenant}", status_code=204)
async def delete_tenant(tenant: str, admin: AdminDep, services: ServicesDep) -> None:
    async with audited(services, admin, "tenant.delete", tenant):
        # Its jobs are cancelled first: none is claimed meanwhile, and a running one's worker stops it
        # (a worker also copes when the job's row vanishes with the tenant).
        await run_in_threadpool(services.jobs.cancel_tenant_jobs, check_name(tenant, "tenant"))
        await lifecycle.delete_tenant(services, tenant)


# Keys


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(tenant: str, admin: AdminDep, services: ServicesDep) -> KeyOut:
    """Make a key for the tenant; the response is the only place its secret ever appears."""
    async with audited(services, admin, "key.create", tenant):
        key_id, secret = await run_in_threadpool(services.store.create_key, check_name(tenant, "tenant"))
    return KeyOut(id=key_id, tenant=tenant, key=secret)


@router.get("/tenants/{tenant}/keys")
def list_keys(tenant: str, _: AdminDep, services: ServicesDep, limit: AdminLimit = 100,
              after: After = None) -> Page[KeyOut]:
    keys, more = services.store.key_page(check_name(tenant, "tenant"), limit, after)
    return Page.of([KeyOut(id=k.id, tenant=tenant, created_at=k.created_at, revoked_at=k.revoked_at)
                    for k in keys], more)


@router.delete("/tenants/{tenant}/keys/{key_id}", status_code=204)
async def revoke_key(tenant: str, key_id: str, admin: AdminDep, services: ServicesDep) -> None:
    async with audited(services, admin, "key.revoke", f"{tenant}/{key_id[:32]}"):
        await run_in_threadpool(services.store.revoke_key, check_name(tenant, "tenant"), key_id)


# Adapters


def _adapter_out(services: Services, tenant: str, name: str, with_manifests: bool = False) -> AdapterOut:
    adapter = services.store.require_adapter(tenant, name)
    manifest = functools.partial(services.registry.manifest, tenant, name) if with_manifests else None
    return AdapterOut.of(adapter, manifest)


@router.post("/tenants/{tenant}/adapters", status_code=201)
async def upload_adapter(
    tenant: str,
    admin: AdminDep,
    services: ServicesDep,
    name: Annotated[str, Form(max_length=200)],
    archive: Annotated[UploadFile | None, File(description="The adapter as .tar.gz or .zip")] = None,
    files: Annotated[list[UploadFile] | None, File(description="adapter_config.json, adapter_model.safetensors")]
    = None,
    activate: Annotated[bool, Form(description="false: publish only (for NAME@N or a canary); the active version "
                                               "stays")] = True,
) -> AdapterOut:
    """Validate and publish a new immutable version, load it on the engine, then make it active (as the adapter's
    promotion policy says), unless `activate` is false."""
    async with audited(services, admin, "adapter.upload", f"{tenant}/{name[:63]}"):
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        try:
            await run_in_threadpool(services.store.require_tenant, tenant)
            with staged_upload(services.settings, services.registry.staging, archive, files) as folder:
                try:
                    await lifecycle.publish(services, folder, tenant, name, origin="upload", activate=activate)
                except OverQuota as exc:
                    raise quota_error(exc) from exc
        except Exception as exc:
            error = as_api_error(exc)
            services.metrics.upload(False, (error.code or error.reason) if error else "internal")
            raise
        services.metrics.upload(True)
    return await run_in_threadpool(_adapter_out, services, tenant, name)


@router.get("/tenants/{tenant}/adapters")
def list_adapters(tenant: str, _: AdminDep, services: ServicesDep, limit: AdminLimit = 100,
                  after: After = None) -> Page[AdapterOut]:
    services.store.require_tenant(check_name(tenant, "tenant"))
    adapters, more = services.store.adapter_page(tenant, limit, after)
    return Page.of([AdapterOut.of(a) for a in adapters], more, id_of=lambda adapter: adapter.name)


@router.get("/tenants/{tenant}/adapters/{name}")
def get_adapter(tenant: str, name: str, _: AdminDep, services: ServicesDep) -> AdapterOut:
    return _adapter_out(services, check_name(tenant, "tenant"), check_name(name, "adapter"), with_manifests=True)


@router.post("/tenants/{tenant}/adapters/{name}/activate")
async def activate_adapter(
    tenant: str, name: str, body: ActivateRequest, admin: AdminDep, services: ServicesDep
) -> AdapterOut:
    async with audited(services, admin, "adapter.activate", f"{tenant}/{name}@{body.version}"):
        await lifecycle.activate(services, check_name(tenant, "tenant"), check_name(name, "adapter"), body.version)
    return await run_in_threadpool(_adapter_out, services, tenant, name)


@router.put("/tenants/{tenant}/adapters/{name}/canary")
async def start_canary(tenant: str, name: str, body: CanaryRequest, admin: AdminDep,
                       services: ServicesDep) -> AdapterOut:
    """A candidate version serves `weight` percent of `NAME`'s requests until it is stopped, promoted (activate
    it) or rolled back by itself."""
    async with audited(services, admin, "adapter.canary.start", f"{tenant}/{name}@{body.version}",
                       detail=f"weight {body.weight}%"):
        await canary.start(services, check_name(tenant, "tenant"), check_name(name, "adapter"), body.model_dump())
    return await run_in_threadpool(_adapter_out, services, tenant, name)


@router.delete("/tenants/{tenant}/adapters/{name}/canary", status_code=204)
async def stop_canary(tenant: str, name: str, admin: AdminDep, services: ServicesDep) -> None:
    async with audited(services, admin, "adapter.canary.stop", f"{tenant}/{name}"):
        await canary.stop(services, check_name(tenant, "tenant"), check_name(name, "adapter"))


@router.delete("/tenants/{tenant}/adapters/{name}", status_code=204)
async def delete_adapter(tenant: str, name: str, admin: AdminDep, services: ServicesDep) -> None:
    async with audited(services, admin, "adapter.delete", f"{tenant}/{name}"):
        await lifecycle.delete_adapter(services, check_name(tenant, "tenant"), check_name(name, "adapter"))


@router.delete("/tenants/{tenant}/adapters/{name}/versions/{version}", status_code=204)
async def delete_version(tenant: str, name: str, version: int, admin: AdminDep, services: ServicesDep) -> None:
    async with audited(services, admin, "adapter.delete_version", f"{tenant}/{name}@{version}"):
        await lifecycle.delete_version(services, check_name(tenant, "tenant"), check_name(name, "adapter"), version)


@router.patch("/tenants/{tenant}/adapters/{name}")
async def update_adapter(tenant: str, name: str, body: AdapterUpdate, admin: AdminDep,
                         services: ServicesDep) -> AdapterOut:
    """The golden set (one of the tenant's files) its versions are evaluated on, and its promotion policy."""
    async with audited(services, admin, "adapter.update", f"{tenant}/{name}"):
        await runs.configure(services, check_name(tenant, "tenant"), check_name(name, "adapter"), body.changes())
    return await run_in_threadpool(_adapter_out, services, tenant, name)


@router.post("/tenants/{tenant}/adapters/{name}/versions/{version}/evaluate")
async def evaluate_version(tenant: str, name: str, version: int, admin: AdminDep, services: ServicesDep) -> dict:
    """Evaluate the version on the adapter's golden set now; the report is stored with it."""
    async with audited(services, admin, "adapter.evaluate", f"{tenant}/{name}@{version}"):
        return await canary.evaluate(services, check_name(tenant, "tenant"), check_name(name, "adapter"), version)


@router.get("/tenants/{tenant}/adapters/{name}/versions/{version}/evaluation", response_model=None)
def version_evaluation(tenant: str, name: str, version: int, _: AdminDep, services: ServicesDep,
                       format: ReportFormat = "json") -> dict | Response:
    report = runs.stored_report(services, check_name(tenant, "tenant"), check_name(name, "adapter"), version)
    return report_response(report, format)


# Audit


@router.get("/audit")
def audit_log(
    _: AdminDep, services: ServicesDep,
    limit: AdminLimit = 100,
    before: Annotated[int | None, Query(ge=1, description="Only records older than this id.")] = None,
    after: Annotated[int | None, Query(ge=1, description="The id of the last record of the previous page.")] = None,
) -> Page[AuditOut]:
    """Newest first. `after` pages as the other lists do; `before` is its older name."""
    records, more = services.store.audit_log(limit, after if after is not None else before)
    return Page.of([AuditOut.model_validate(r, from_attributes=True) for r in records], more)
