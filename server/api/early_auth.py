"""Authenticate a request before the first byte of its body is read.

FastAPI reads (and parses) a route's body before it runs the route's dependencies, so without this
anyone could make the gateway read a 512 MB upload only to be told 401 at the end. For requests that
carry a body (POST, PUT, PATCH) to the API (`/v1/...`, `/admin/...`) this middleware checks the
`Authorization` header first, with the same rules as the routes (`server.serving.tenancy`): no key or an
unknown key is 401, a tenant's key on `/admin` (or the admin key on `/v1`) is 403. Only then does the
application see the request. The route's dependency (`server.api.deps`) reuses what was found here, with the
same rules, so a request costs one key look-up.

A refused request's body is never read, so the answer says `Connection: close`: the unread bytes must
not be taken for the next request, and the server reads none of them.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.body_limit import send_error
from server.errors import APIError
from server.serving.tenancy import authenticate_admin, authenticate_tenant

_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
AUTHENTICATED = "authenticated"  # request.state key: the identity this gate found (a Tenant or a KeyIdentity)


class AuthBeforeBody:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _WITH_BODY:
            services = getattr(scope["app"].state, "services", None) if "app" in scope else None
            check = _check_for(scope["path"])
            if services is not None and check is not None:
                # The first of repeated headers counts, as in the routes (Starlette's Headers.get).
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
                try:
                    identity = await run_in_threadpool(check, services, headers)
                except APIError as error:
                    services.metrics.rejected(error.reason)
                    await send_error(send, error, close=True)
                    return
                # The route's dependency takes it from here instead of looking the key up again.
                scope.setdefault("state", {})[AUTHENTICATED] = identity
        await self.app(scope, receive, send)


def _check_for(path: str):
    if path == "/admin" or path.startswith("/admin/"):
        return _admin
    if path.startswith("/v1/"):
        return _tenant
    return None


def _admin(services, headers: dict[str, str]):
    return authenticate_admin(services.settings, services.store, headers.get("authorization"))


def _tenant(services, headers: dict[str, str]):
    return authenticate_tenant(services.settings, services.store, headers.get("authorization"),
                               headers.get("x-tenant-id"))
