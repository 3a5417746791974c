"""OpenAI fine-tuning jobs API, tenant-scoped. The worker process does the training."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import JobsDep, ServicesDep, TenantDep
from server.api.paging import After, JobsLimit
from server.errors import NotFound
from server.finetuning import training
from server.storage.jobstore import JobStore
from server.wire.fine_tuning import (
    CheckpointObject,
    JobCreate,
    JobEventObject,
    JobObject,
    metadata_filter,
)
from server.wire.pages import Page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("")
def create_job(body: JobCreate, tenant: TenantDep, services: ServicesDep) -> JobObject:
    return JobObject.of(training.create_job(services, tenant, body))


@router.get("")
def list_jobs(request: Request, tenant: TenantDep, jobs: JobsDep, limit: JobsLimit = 20, after: After = None
              ) -> Page[JobObject]:
    """`metadata[k]=v` (repeatable) keeps the jobs whose metadata has every such pair."""
    rows, more = jobs.list_jobs(tenant.id, limit, after, metadata_filter(request.query_params.multi_items()))
    return Page.of([JobObject.of(j) for j in rows], more)


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
def list_events(job_id: str, tenant: TenantDep, jobs: JobsDep, limit: JobsLimit = 20, after: After = None
                ) -> Page[JobEventObject]:
    return event_page(jobs, tenant.id, job_id, limit, after)


def event_page(jobs: JobStore, tenant_id: str, job_id: str, limit: int, after: str | None
               ) -> Page[JobEventObject]:
    """A job's events, newest first, older than the event `after` names (`ftevent-N`)."""
    number = None if after is None else after.removeprefix("ftevent-")
    if number is not None and not (number.isascii() and number.isdigit() and len(number) < 19):
        raise NotFound(f"after: no event with id '{after[:64]}'.", param="after")
    rows, more = jobs.list_events(tenant_id, job_id, limit, None if number is None else int(number))
    return Page.of([JobEventObject.of(e) for e in rows], more)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, tenant: TenantDep, jobs: JobsDep, limit: JobsLimit = 10, after: After = None
                     ) -> Page[CheckpointObject]:
    rows, more = jobs.list_checkpoints(tenant.id, job_id, limit, after)
    return Page.of([CheckpointObject.of(job_id, c) for c in rows], more)
