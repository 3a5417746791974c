"""FastAPI dependencies: the shared services and the calling tenant.

`TenantDep` is a plain function, so FastAPI runs its database look-up in a worker thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from server.jobstore import JobStore
from server.services import Services
from server.store import KeyIdentity, Tenant
from server.tenancy import authenticate_admin, authenticate_tenant


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_jobs(services: ServicesDep) -> JobStore:
    return services.jobs


JobsDep = Annotated[JobStore, Depends(get_jobs)]


def current_tenant(
    services: ServicesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_tenant_id: Annotated[str | None, Header()] = None,
) -> Tenant:
    return authenticate_tenant(services.settings, services.store, authorization, x_tenant_id)


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def current_admin(
    services: ServicesDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> KeyIdentity:
    return authenticate_admin(services.settings, services.store, authorization)


AdminDep = Annotated[KeyIdentity, Depends(current_admin)]
