"""FastAPI dependencies: the shared services and the calling tenant.

`TenantDep` is a plain function, so FastAPI runs its database look-up in a worker thread (when the gate
before the body, `server.api.early_auth`, has not found the caller already).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from server.api.early_auth import AUTHENTICATED
from server.errors import Forbidden
from server.services import Services
from server.serving.tenancy import authenticate_admin, authenticate_tenant, bearer_token, identify_key
from server.storage.jobstore import JobStore
from server.storage.store import KeyIdentity, Tenant


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_jobs(services: ServicesDep) -> JobStore:
    return services.jobs


JobsDep = Annotated[JobStore, Depends(get_jobs)]


def current_tenant(
    services: ServicesDep,
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_tenant_id: Annotated[str | None, Header()] = None,
) -> Tenant:
    found = getattr(request.state, AUTHENTICATED, None)  # by the gate before the body (server.api.early_auth)
    if isinstance(found, Tenant):
        return found
    return authenticate_tenant(services.settings, services.store, authorization, x_tenant_id)


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def current_admin(
    services: ServicesDep, request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> KeyIdentity:
    found = getattr(request.state, AUTHENTICATED, None)
    if isinstance(found, KeyIdentity) and found.is_admin:
        return found
    return authenticate_admin(services.settings, services.store, authorization)


AdminDep = Annotated[KeyIdentity, Depends(current_admin)]


def metrics_reader(
    services: ServicesDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> None:
    """`/metrics` names every tenant with its usage: only the metrics token or an admin key reads it
    (401 without a valid key, 403 for a tenant's key)."""
    token = bearer_token(authorization)
    secret = services.settings.metrics_token
    if token is not None and secret is not None and hmac.compare_digest(
        token.encode(), secret.get_secret_value().encode()
    ):
        return
    if not identify_key(services.settings, services.store, token).is_admin:
        raise Forbidden("Metrics need the metrics token or an admin key.")
