"""OpenAI fine-tuning jobs API, tenant-scoped. The worker process does the training."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from server.api.deps import JobsDep, ServicesDep, TenantDep
from server.finetuning import training
from server.wire.fine_tuning import (
    CheckpointList,
    CheckpointObject,
    JobCreate,
    JobEventList,
    JobEventObject,
    JobList,
    JobObject,
    metadata_filter,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=64)]


@router.post("")
def create_job(body: JobCreate, tenant: TenantDep, services: ServicesDep) -> JobObject:
    return JobObject.of(training.create_job(services, tenant, body))


@router.get("")
def list_jobs(request: Request, tenant: TenantDep, jobs: JobsDep, limit: Limit = 20, after: Cursor = None) -> JobList:
    """`metadata[k]=v` (repeatable) keeps the jobs whose metadata has every such pair."""
    rows, more = jobs.list_jobs(tenant.id, limit, after, metadata_filter(request.query_params.multi_items()))
    return JobList(data=[JobObject.of(j) for j in rows], has_more=more)


@router.get("/{job_id}")
def get_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> JobObject:
    return JobObject.of(jobs.get_job(tenant.id, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> JobObject:
    return JobObject.of(jobs.request_cancel(tenant.id, job_id))


@router.post("/{job_id}/pause")
def pause_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> JobObject:
    training.refuse_pause(jobs, tenant, job_id, "pause")


@router.post("/{job_id}/resume")
def resume_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> JobObject:
    training.refuse_pause(jobs, tenant, job_id, "resume")


@router.get("/{job_id}/events")
def list_events(job_id: str, tenant: TenantDep, jobs: JobsDep, limit: Limit = 20, after: Cursor = None
                ) -> JobEventList:
    before = int(after.removeprefix("ftevent-")) if after and after.removeprefix("ftevent-").isdigit() else None
    rows, more = jobs.list_events(tenant.id, job_id, limit, before)
    return JobEventList(data=[JobEventObject.of(e) for e in rows], has_more=more)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, tenant: TenantDep, jobs: JobsDep, limit: Limit = 10, after: Cursor = None
                     ) -> CheckpointList:
    rows, more = jobs.list_checkpoints(tenant.id, job_id, limit, after)
    data = [CheckpointObject.of(job_id, c) for c in rows]
    return CheckpointList(data=data, has_more=more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)
