"""OpenAI fine-tuning jobs API, tenant-scoped. The worker process does the training."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.api.deps import JobsDep, ServicesDep, TenantDep
from server.finetuning import training
from server.wire.fine_tuning import JobCreate, JobEventList, JobEventObject, JobList, JobObject

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("")
def create_job(body: JobCreate, tenant: TenantDep, services: ServicesDep, jobs: JobsDep) -> JobObject:
    return JobObject.of(training.create_job(services.settings, jobs, tenant, body))


@router.get("")
def list_jobs(tenant: TenantDep, jobs: JobsDep, limit: Limit = 20,
              after: Annotated[str | None, Query(max_length=64)] = None) -> JobList:
    rows, more = jobs.list_jobs(tenant.id, limit, after)
    return JobList(data=[JobObject.of(j) for j in rows], has_more=more)


@router.get("/{job_id}")
def get_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> JobObject:
    return JobObject.of(jobs.get_job(tenant.id, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> JobObject:
    return JobObject.of(jobs.request_cancel(tenant.id, job_id))


@router.get("/{job_id}/events")
def list_events(job_id: str, tenant: TenantDep, jobs: JobsDep, limit: Limit = 20,
                after: Annotated[str | None, Query(max_length=64)] = None) -> JobEventList:
    before = int(after.removeprefix("ftevent-")) if after and after.removeprefix("ftevent-").isdigit() else None
    rows, more = jobs.list_events(tenant.id, job_id, limit, before)
    return JobEventList(data=[JobEventObject.of(e) for e in rows], has_more=more)
