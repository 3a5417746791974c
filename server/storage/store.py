"""The database: tenants, hashed API keys and the audit log; adapters through `AdapterRecords`.

SQLite by default (WAL mode, so the CLI and a running server share the file); PostgreSQL when several
gateways share one database (`postgresql://…`, driven by psycopg 3; see `server.storage.connection`). The schema
is Alembic's (`server.storage.migrations`). Methods are synchronous and short; async callers run them in a worker
thread. They return plain detached objects, and raise `Missing` or `Conflict` for the caller to map.
Read-modify-write methods lock the rows they change (`ROW_LOCK`; nothing on SQLite, whose writers are serial
anyway). Files, jobs and events are `server.storage.jobstore`'s.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import URL, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.names import check_name
from server.errors import Missing
from server.errors import StateConflict as Conflict
from server.storage.adapter_records import AdapterRecords, AdapterView, OverQuota, VersionView
from server.storage.connection import ROW_LOCK, build_engine, database_url, has_nul, storable
from server.storage.db import Adapter, ApiKey, AuditRecord, Tenant, utcnow
from server.storage.paging import keyset_page

# Re-exported: callers import these from here, as they did before the adapter methods moved out.
__all__ = ["ROW_LOCK", "AdapterView", "Conflict", "KeyIdentity", "Missing", "OverQuota", "Store", "Tenant",
           "VersionView", "build_engine", "database_url", "has_nul", "storable"]

KEY_PREFIX = "ls"


@dataclass(frozen=True)
class KeyIdentity:
    key_id: str
    tenant_id: str | None  # None: an admin key
    tenant: Tenant | None = field(default=None, compare=False)  # read with the key: one query per request

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store(AdapterRecords):
    def __init__(self, url: str | URL):
        self.engine = build_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> str | None:
        """Bring the database to the newest schema (Alembic); returns the revision it is at."""
        from server.storage.migrations import upgrade

        return upgrade(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # Tenants
    def create_tenant(self, tenant_id: str, limits: dict | None = None) -> Tenant:
        check_name(tenant_id, "tenant")
        try:
            with self.session() as s:
                tenant = Tenant(id=tenant_id, limits=limits or {})
                s.add(tenant)
            return tenant
        except IntegrityError as exc:
            raise Conflict(f"tenant '{tenant_id}' already exists") from exc

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        if has_nul(tenant_id):
            return None
        with self.session() as s:
            return s.get(Tenant, tenant_id)

    def require_tenant(self, tenant_id: str) -> Tenant:
        with self.session() as s:
            return self._tenant(s, tenant_id)

    def list_tenants(self) -> list[Tenant]:
        with self.session() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.id)))

    def tenant_page(self, limit: int, after: str | None = None) -> tuple[list[Tenant], bool]:
        """A page of tenants by id, after the id `after`."""
        with self.session() as s:
            return keyset_page(s, select(Tenant), (Tenant.id,), limit=limit,
                               after=None if after is None else (after,))

    def update_tenant(self, tenant_id: str, **changes) -> Tenant:
        """Change `default_adapter` (None for the base model) and/or `limits`."""
        with self.session() as s:
            tenant = self._tenant(s, tenant_id, lock=True)
            if "default_adapter" in changes:
                name = changes["default_adapter"]
                if name is not None and self._adapter(s, tenant_id, name) is None:
                    raise Missing(f"adapter '{name}' does not exist")
                tenant.default_adapter = name
            if "limits" in changes:
                tenant.limits = dict(changes["limits"] or {})
            return tenant

    def delete_tenant(self, tenant_id: str) -> list[tuple[str, int]]:
        """Delete a tenant with its keys and adapters; returns the (adapter, version) pairs it had."""
        with self.session() as s:
            tenant = self._tenant(s, tenant_id)
            adapters = list(s.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id)))
            gone = [(a.name, v.version) for a in adapters for v in a.versions]
            for adapter in adapters:
                s.delete(adapter)
            for key in s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)):
                s.delete(key)
            s.delete(tenant)
            return gone

    # Keys
    def create_key(self, tenant_id: str | None) -> tuple[str, str]:
        """Make a key for a tenant (or an admin key when None). Returns (key id, full secret key);
        the secret exists only in the return value."""
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        with self.session() as s:
            if tenant_id is not None:
                self._tenant(s, tenant_id)
            s.add(ApiKey(id=key_id, tenant_id=tenant_id, secret_hash=_hash_secret(secret)))
        return key_id, secret

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        with self.session() as s:
            self._tenant(s, tenant_id)
            return list(s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)))

    def key_page(self, tenant_id: str, limit: int, after: str | None = None) -> tuple[list[ApiKey], bool]:
        """A page of the tenant's keys, oldest first, after the key `after` (Missing: not one of its keys)."""
        with self.session() as s:
            self._tenant(s, tenant_id)
            cursor = None
            if after is not None:
                anchor = None if has_nul(after) else s.get(ApiKey, after)
                if anchor is None or anchor.tenant_id != tenant_id:
                    raise Missing(f"after: this tenant has no key '{after[:64]}'.")
                cursor = (anchor.created_at, anchor.id)
            return keyset_page(s, select(ApiKey).where(ApiKey.tenant_id == tenant_id),
                               (ApiKey.created_at, ApiKey.id), limit=limit, after=cursor)

    def revoke_key(self, tenant_id: str, key_id: str) -> None:
        if has_nul(key_id):
            raise Missing(f"key '{key_id}' does not exist")
        with self.session() as s:
            key = s.get(ApiKey, key_id, with_for_update=ROW_LOCK)
            if key is None or key.tenant_id != tenant_id or key.revoked_at is not None:
                raise Missing(f"key '{key_id}' does not exist")
            key.revoked_at = utcnow()

    def identify(self, secret: str) -> KeyIdentity | None:
        """The key's identity, or None for an unknown, malformed or revoked key. The row is found by
        the key id embedded in the key; the hash comparison is constant-time."""
        parts = secret.split("-", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX or has_nul(parts[1]):
            return None
        with self.session() as s:
            row = s.get(ApiKey, parts[1])
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_hash, _hash_secret(secret)):
                return None
            tenant = s.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
            return KeyIdentity(row.id, row.tenant_id, tenant)

    def has_admin_key(self) -> bool:
        with self.session() as s:
            stmt = select(func.count()).select_from(ApiKey).where(
                ApiKey.tenant_id.is_(None), ApiKey.revoked_at.is_(None)
            )
            return s.scalar(stmt) > 0

    # Audit
    def audit(self, actor: str, action: str, obj: str, result: str, detail: str | None = None) -> None:
        with self.session() as s:
            s.add(AuditRecord(actor=storable(actor)[:32], action=storable(action)[:64], object=storable(obj)[:256],
                              result=storable(result)[:64], detail=detail and storable(detail)[:2000]))

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> tuple[list[AuditRecord], bool]:
        """A page of the audit log, newest first, older than the record `before_id`; and whether more follow."""
        with self.session() as s:
            return keyset_page(s, select(AuditRecord), (AuditRecord.id,), limit=limit, descending=True,
                               after=None if before_id is None else (before_id,))

    # Helpers
    @staticmethod
    def _tenant(s: Session, tenant_id: str, lock: bool = False) -> Tenant:
        tenant = None if has_nul(tenant_id) else s.get(Tenant, tenant_id, with_for_update=ROW_LOCK if lock else None)
        if tenant is None:
            raise Missing(f"tenant '{storable(tenant_id)}' does not exist")
        return tenant

