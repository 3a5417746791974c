"""OpenAI Files API, tenant-scoped: training data for fine-tuning jobs, and the jobs' result files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from server.api.deps import JobsDep, ServicesDep, TenantDep
from server.api.paging import After, FilesLimit
from server.finetuning import training
from server.wire.fine_tuning import FileDeleted, FileObject
from server.wire.pages import Page

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("")
def upload_file(
    tenant: TenantDep, services: ServicesDep, jobs: JobsDep,
    file: Annotated[UploadFile, File(description="JSONL in OpenAI's chat fine-tuning format")],
    purpose: Annotated[str, Form(max_length=32)],
) -> FileObject:
    return FileObject.of(training.store_file(services.settings, jobs, tenant, file, purpose))


@router.get("")
def list_files(tenant: TenantDep, jobs: JobsDep, limit: FilesLimit = 10_000, after: After = None,
               order: Annotated[Literal["asc", "desc"], Query()] = "desc") -> Page[FileObject]:
    files, more = jobs.list_files(tenant.id, limit, after, newest_first=order == "desc")
    return Page.of([FileObject.of(f) for f in files], more)


@router.get("/{file_id}")
def get_file(file_id: str, tenant: TenantDep, jobs: JobsDep) -> FileObject:
    return FileObject.of(jobs.get_file(tenant.id, file_id))


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, tenant: TenantDep, services: ServicesDep, jobs: JobsDep) -> FileResponse:
    path, row = training.file_content(services.settings, jobs, tenant, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=row.filename)


@router.delete("/{file_id}")
def delete_file(file_id: str, tenant: TenantDep, services: ServicesDep, jobs: JobsDep) -> FileDeleted:
    training.delete_file(services.settings, jobs, tenant, file_id)
    return FileDeleted(id=file_id)
