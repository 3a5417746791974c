"""Who is calling, and which model a `model` name means for them.

Both rules live here and nowhere else. A name always resolves inside the caller's tenant: another
tenant's adapter is indistinguishable from one that does not exist.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from adapters.names import engine_name, is_valid_name
from adapters.registry import Registry
from server.config import Settings
from server.errors import Forbidden, ModelNotFound, Unauthorized
from server.serving.canary_split import serving_version
from server.storage.store import KeyIdentity, Store, Tenant

log = logging.getLogger("loraserve.tenancy")

DEFAULT_MODEL = "default"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def identify_key(settings: Settings, store: Store, token: str | None) -> KeyIdentity:
    """The identity behind a bearer token; 401 when there is none."""
    if token is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        return KeyIdentity("env-admin", None)
    identity = store.identify(token)
    if identity is None:
        raise Unauthorized("Invalid API key.")
    return identity


def authenticate_admin(settings: Settings, store: Store, authorization: str | None) -> KeyIdentity:
    identity = identify_key(settings, store, bearer_token(authorization))
    if not identity.is_admin:
        raise Forbidden("This route needs an admin key.")
    return identity


def authenticate_tenant(
    settings: Settings, store: Store, authorization: str | None, tenant_header: str | None
) -> Tenant:
    """The calling tenant, from its key (checked against X-Tenant-ID when sent), or from X-Tenant-ID
    alone when the deployment trusts a proxy in front (auth_mode=header)."""
    if settings.auth_mode == "header":
        if not tenant_header:
            raise Unauthorized("Missing X-Tenant-ID header.")
        tenant = store.get_tenant(tenant_header) if is_valid_name(tenant_header) else None
        if tenant is None:
            raise Unauthorized("Unknown tenant.")
        return tenant
    identity = identify_key(settings, store, bearer_token(authorization))
    if identity.is_admin:
        raise Forbidden("This is an admin key; OpenAI routes take a tenant's key.")
    if tenant_header is not None and tenant_header != identity.tenant_id:
        raise Forbidden("X-Tenant-ID does not match the API key's tenant.")
    if identity.tenant is None:  # deleted while the key was in flight
        raise Unauthorized("Invalid API key.")
    return identity.tenant


@dataclass(frozen=True)
class ModelRoute:
    """Where a request goes: the base model (adapter None) or one adapter version. `canary` and `stable`: the
    adapter's canary and active version when the version was chosen by the canary's split."""

    requested: str
    engine_model: str
    adapter: str | None = None
    version: int | None = None
    path: Path | None = None
    canary: dict | None = None
    stable: int | None = None


def resolve_model(settings: Settings, store: Store, registry: Registry, tenant: Tenant, model: str,
                  sticky: str | None = None) -> ModelRoute:
    """Apply the model-name rule of the design, inside `tenant`. `sticky` keeps a canary's split stable per end
    user (`server.serving.canary_split`)."""
    if model in {tenant.id, DEFAULT_MODEL, settings.default_model_alias}:
        if tenant.default_adapter is None:
            return ModelRoute(model, settings.served_model_name)
        return _adapter_route(settings, store, registry, tenant, model, tenant.default_adapter, None, sticky)
    if model == settings.served_model_name:
        return ModelRoute(model, settings.served_model_name)
    name, sep, version_text = model.partition("@")
    version = None
    if sep:
        # ASCII digits only: str.isdigit also takes "²", which int() then refuses.
        if not (version_text.isascii() and version_text.isdigit()) or len(version_text) > 9:
            raise ModelNotFound(model)
        version = int(version_text)
    if not is_valid_name(name):
        raise ModelNotFound(model)
    return _adapter_route(settings, store, registry, tenant, model, name, version, sticky)


def _adapter_route(settings, store, registry, tenant, requested, name, version, sticky=None) -> ModelRoute:
    adapter = store.get_adapter(tenant.id, name)
    if adapter is None:
        raise ModelNotFound(requested)
    split = version is None and adapter.canary is not None
    version = serving_version(adapter, sticky) if version is None else version
    if version is None or version not in adapter.versions:
        raise ModelNotFound(requested)
    path = registry.version_path(tenant.id, name, version)
    if not path.is_dir():
        log.error("registry is missing %s/%s version %s", tenant.id, name, version)
        raise ModelNotFound(requested)
    return ModelRoute(requested, engine_name(tenant.id, name, version), name, version, path,
                      adapter.canary if split else None, adapter.active_version if split else None)
