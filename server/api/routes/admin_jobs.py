"""Admin API over any tenant's fine-tuning jobs: the same job, event and cancel answers a tenant gets for its own."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from adapters.names import check_name
from server.api.deps import AdminDep, ServicesDep
from server.api.paging import After, JobsLimit
from server.api.routes.admin import audited
from server.api.routes.fine_tuning import event_page
from server.wire.fine_tuning import JobEventObject, JobObject
from server.wire.pages import Page

router = APIRouter(prefix="/admin/tenants/{tenant}/fine_tuning/jobs", tags=["admin"])


@router.get("")
def list_jobs(tenant: str, _: AdminDep, services: ServicesDep, limit: JobsLimit = 20, after: After = None
              ) -> Page[JobObject]:
    services.store.require_tenant(check_name(tenant, "tenant"))
    rows, more = services.jobs.list_jobs(tenant, limit, after)
    return Page.of([JobObject.of(j) for j in rows], more)


@router.get("/{job_id}")
def get_job(tenant: str, job_id: str, _: AdminDep, services: ServicesDep) -> JobObject:
    return JobObject.of(services.jobs.get_job(check_name(tenant, "tenant"), job_id))


@router.get("/{job_id}/events")
def list_events(tenant: str, job_id: str, _: AdminDep, services: ServicesDep, limit: JobsLimit = 20,
                after: After = None) -> Page[JobEventObject]:
    return event_page(services.jobs, check_name(tenant, "tenant"), job_id, limit, after)


@router.post("/{job_id}/cancel")
async def cancel_job(tenant: str, job_id: str, admin: AdminDep, services: ServicesDep) -> JobObject:
    async with audited(services, admin, "job.cancel", f"{tenant}/{job_id[:64]}"):
        job = await run_in_threadpool(services.jobs.request_cancel, check_name(tenant, "tenant"), job_id)
    return JobObject.of(job)
