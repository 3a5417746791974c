"""The database: tenants, hashed API keys, adapters and their versions, the audit log.

SQLite by default (WAL mode, so the CLI and a running server share the file); PostgreSQL when several
gateways share one database (`postgresql://…`, driven by psycopg 3). The schema is Alembic's
(`server.storage.migrations`). Methods are synchronous and short; async callers run them in a worker thread. They
return plain detached objects, and raise `Missing` or `Conflict` for the caller to map. Read-modify-write
methods lock the rows they change (`ROW_LOCK`; nothing on SQLite, whose writers are serial anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import URL, create_engine, event, func, make_url, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.names import check_name
from server.errors import Missing
from server.errors import StateConflict as Conflict
from server.storage.db import Adapter, AdapterVersion, ApiKey, AuditRecord, Tenant, VersionSequence, utcnow

__all__ = ["AdapterView", "Conflict", "KeyIdentity", "Missing", "OverQuota", "Store", "Tenant"]


class OverQuota(Conflict):
    """Recording the adapter version would pass a tenant's quota (`what`: `adapters` or `adapter_bytes`)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what

KEY_PREFIX = "ls"
# The row lock of read-modify-write methods: FOR NO KEY UPDATE on PostgreSQL (rows that reference the locked
# one can still be added), nothing on SQLite.
ROW_LOCK = {"key_share": True}


@dataclass(frozen=True)
class VersionView:
    version: int
    rank: int
    size_bytes: int
    source: str
    created_at: datetime
    state: str = "verified"  # or `unverified` (no engine has loaded it yet) or `refused` (an engine would not)


@dataclass(frozen=True)
class AdapterView:
    """What the gateway needs to know of one adapter, detached from the session."""

    tenant_id: str
    name: str
    active_version: int | None
    versions: tuple[int, ...]
    created_at: datetime
    version_details: tuple[VersionView, ...] = ()


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


def has_nul(*values: str | None) -> bool:
    """PostgreSQL text cannot hold NUL: an id with one is one that does not exist (on any database)."""
    return any(v is not None and "\x00" in v for v in values)


def storable(value: str) -> str:
    """Free text as PostgreSQL can store it (and SQLite the same): NUL becomes U+FFFD."""
    return value.replace("\x00", "\ufffd")


def database_url(url: str | URL) -> URL:
    """The URL with its driver made explicit: `postgresql://` and `postgres://` mean psycopg 3 (the driver
    loraserve installs; SQLAlchemy's default, psycopg2, is not)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def build_engine(url: str | URL) -> Engine:
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    options: dict = {}
    if backend == "postgresql":
        # Requests run store calls in a thread pool: a few connections kept, more lent under load, recycled
        # now and then (load balancers and PgBouncer drop idle ones); pre-ping replaces a dead one.
        options = {"pool_size": 5, "max_overflow": 15, "pool_timeout": 30, "pool_recycle": 1800}
        if parsed.get_driver_name() in ("psycopg", "psycopg2"):
            libpq = {"connect_timeout": 10, "application_name": "loraserve"}
            options["connect_args"] = {k: v for k, v in libpq.items() if k not in parsed.query}
    return create_engine(parsed, pool_pre_ping=True, **options)


class Store:
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

    # Adapters
    def reserve_version(self, tenant_id: str, name: str) -> int:
        """The next version number of `tenant/name`, never handed out before, also to another process or
        gateway: on PostgreSQL one upsert that locks the sequence row; elsewhere the UPDATE takes the
        database's write lock first."""
        if self.is_postgres:
            with self.session() as s:
                bump = pg_insert(VersionSequence).values(tenant_id=tenant_id, name=name, last=1)
                bump = bump.on_conflict_do_update(
                    index_elements=[VersionSequence.tenant_id, VersionSequence.name],
                    set_={"last": VersionSequence.last + 1},
                ).returning(VersionSequence.last)
                return s.scalar(bump)
        where = (VersionSequence.tenant_id == tenant_id, VersionSequence.name == name)
        for _ in range(10):
            try:
                with self.session() as s:
                    bumped = s.execute(update(VersionSequence).where(*where).values(last=VersionSequence.last + 1))
                    if bumped.rowcount == 0:
                        s.add(VersionSequence(tenant_id=tenant_id, name=name, last=1))
                        s.flush()
                    return s.scalar(select(VersionSequence.last).where(*where))
            except IntegrityError:
                continue  # another publisher created the sequence first; bump it instead
        raise RuntimeError("could not reserve a version number")

    def add_version(
        self, tenant_id: str, name: str, version: int, *, rank: int, size_bytes: int, source: str,
        activate: bool = True, max_adapters: int | None = None, max_bytes: int | None = None,
    ) -> bool:
        """Record a published version (its number comes from `reserve_version`), `unverified` until an
        engine loads it; with `activate`, make it active if it is the newest (`activate_if_newer`).
        Returns whether it became active. `OverQuota`, and nothing recorded, when the tenant would then
        have more than `max_adapters` adapters or `max_bytes` bytes of versions. The counts are taken after
        the insert, in its transaction: on SQLite the insert holds the write lock, on PostgreSQL the
        tenant's row is locked first, so concurrent publishes cannot both slip under a quota."""
        for attempt in range(3):
            try:
                with self.session() as s:
                    self._tenant(s, tenant_id, lock=True)
                    adapter = self._adapter(s, tenant_id, name, lock=True)
                    if adapter is None:
                        adapter = Adapter(tenant_id=tenant_id, name=name)
                        s.add(adapter)
                        s.flush()
                    s.add(AdapterVersion(adapter_id=adapter.id, version=version, rank=rank,
                                         size_bytes=size_bytes, source=source, state="unverified"))
                    s.flush()
                    self._check_quota(s, tenant_id, max_adapters, max_bytes)
                break
            except IntegrityError:  # a concurrent first publish created the adapter row; a retry finds it
                if attempt == 2:
                    raise
        return activate and self.activate_if_newer(tenant_id, name, version)[0]

    @staticmethod
    def _check_quota(s: Session, tenant_id: str, max_adapters: int | None, max_bytes: int | None) -> None:
        if max_adapters is not None:
            count = s.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id))
            if count > max_adapters:
                raise OverQuota(f"The tenant already has {max_adapters} adapters, its quota; delete one first.",
                                "adapters")
        if max_bytes is not None:
            total = s.scalar(select(func.coalesce(func.sum(AdapterVersion.size_bytes), 0)).join(Adapter)
                             .where(Adapter.tenant_id == tenant_id))
            if total > max_bytes:
                raise OverQuota(f"This version would bring the tenant's adapters to {total} bytes, above its "
                                f"quota of {max_bytes}; delete old versions first.", "adapter_bytes")

    def activate_if_newer(self, tenant_id: str, name: str, version: int) -> tuple[bool, int | None]:
        """Make a just-published `version` active unless a newer one already is: concurrent publishes end
        with the highest number active, whatever order they finish in. Returns (activated, the version
        active before). The version's `fallback_version` is set to that previous one (see
        `refuse_version`). Two statements, and the conditional UPDATE decides: on SQLite the first write
        takes the database's lock, on PostgreSQL the UPDATE re-checks its condition on the locked row."""
        with self.session() as s:
            adapter_id = self._existing_adapter(s, tenant_id, name).id
            active = select(Adapter.active_version).where(Adapter.id == adapter_id).scalar_subquery()
            s.execute(update(AdapterVersion).where(AdapterVersion.adapter_id == adapter_id,
                                                   AdapterVersion.version == version)
                      .values(fallback_version=active))
            previous = s.scalar(select(AdapterVersion.fallback_version).where(
                AdapterVersion.adapter_id == adapter_id, AdapterVersion.version == version))
            done = s.execute(update(Adapter).where(
                Adapter.id == adapter_id, or_(Adapter.active_version.is_(None), Adapter.active_version < version),
            ).values(active_version=version))
            return done.rowcount == 1, previous

    def mark_verified(self, tenant_id: str, name: str, version: int) -> bool:
        """An engine loaded the version: `unverified` becomes `verified` (a refusal is never undone)."""
        with self.session() as s:
            done = s.execute(update(AdapterVersion).where(
                AdapterVersion.adapter_id == self._adapter_id(tenant_id, name), AdapterVersion.version == version,
                AdapterVersion.state == "unverified").values(state="verified"))
            return done.rowcount == 1

    def refuse_version(self, tenant_id: str, name: str, version: int) -> tuple[bool, int | None] | None:
        """An engine refused an `unverified` version at its first load: it becomes `refused` and can never
        be active again. If it was active, the adapter falls back to the version active before it (its
        `fallback_version`, following refusals down the chain), else to the newest verified version, else
        to none (NAME answers 404). Returns (it was active, the version active now), or None when the
        version was not unverified (verified versions that fail later are an operational error, not a
        verdict on the adapter)."""
        with self.session() as s:
            marked = s.execute(update(AdapterVersion).where(
                AdapterVersion.adapter_id == self._adapter_id(tenant_id, name), AdapterVersion.version == version,
                AdapterVersion.state == "unverified").values(state="refused"))
            if marked.rowcount != 1:
                return None
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)  # SQLite: under the write lock now
            if adapter.active_version != version:
                return False, adapter.active_version
            adapter.active_version = _fallback(adapter, version)
            return True, adapter.active_version

    def get_adapter(self, tenant_id: str, name: str) -> AdapterView | None:
        with self.session() as s:
            adapter = self._adapter(s, tenant_id, name)
            return _view(adapter) if adapter else None

    def list_adapters(self, tenant_id: str) -> list[AdapterView]:
        with self.session() as s:
            rows = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.name))
            return [_view(a) for a in rows]

    def activate(self, tenant_id: str, name: str, version: int) -> int | None:
        """Make `version` the active one; returns the version that was active before. A `refused` version
        cannot be; an `unverified` one falls back to the previous if an engine refuses it."""
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            row = next((v for v in adapter.versions if v.version == version), None)
            if row is None:
                raise Missing(f"adapter '{name}' has no version {version}")
            if row.state == "refused":
                raise Conflict(f"version {version} was refused by the inference engine; it cannot be made active")
            previous, adapter.active_version = adapter.active_version, version
            if row.state == "unverified" and previous != version:
                row.fallback_version = previous
            return previous

    def delete_version(self, tenant_id: str, name: str, version: int) -> None:
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            row = next((v for v in adapter.versions if v.version == version), None)
            if row is None:
                raise Missing(f"adapter '{name}' has no version {version}")
            if adapter.active_version == version:
                raise Conflict(f"version {version} is active; activate another version or delete the adapter")
            adapter.versions.remove(row)

    def delete_adapter(self, tenant_id: str, name: str) -> list[int]:
        """Delete an adapter and all its versions; returns the version numbers it had."""
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            versions = [v.version for v in adapter.versions]
            tenant = s.get(Tenant, tenant_id, with_for_update=ROW_LOCK)
            if tenant.default_adapter == name:
                tenant.default_adapter = None
            s.delete(adapter)
            return versions

    # Audit
    def audit(self, actor: str, action: str, obj: str, result: str, detail: str | None = None) -> None:
        with self.session() as s:
            s.add(AuditRecord(actor=storable(actor)[:32], action=storable(action)[:64], object=storable(obj)[:256],
                              result=storable(result)[:64], detail=detail and storable(detail)[:2000]))

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[AuditRecord]:
        with self.session() as s:
            stmt = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
            if before_id is not None:
                stmt = stmt.where(AuditRecord.id < before_id)
            return list(s.scalars(stmt))

    # Helpers
    @staticmethod
    def _tenant(s: Session, tenant_id: str, lock: bool = False) -> Tenant:
        tenant = None if has_nul(tenant_id) else s.get(Tenant, tenant_id, with_for_update=ROW_LOCK if lock else None)
        if tenant is None:
            raise Missing(f"tenant '{storable(tenant_id)}' does not exist")
        return tenant

    @staticmethod
    def _adapter(s: Session, tenant_id: str, name: str, lock: bool = False) -> Adapter | None:
        if has_nul(tenant_id, name):
            return None
        stmt = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        return s.scalar(stmt.with_for_update(**ROW_LOCK) if lock else stmt)

    @staticmethod
    def _adapter_id(tenant_id: str, name: str):
        """The adapter's id, as a subquery of the statement it is used in."""
        return select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.name == name).scalar_subquery()

    def _existing_adapter(self, s: Session, tenant_id: str, name: str, lock: bool = False) -> Adapter:
        adapter = self._adapter(s, tenant_id, name, lock)
        if adapter is None:
            raise Missing(f"adapter '{name}' does not exist")
        return adapter


def _fallback(adapter: Adapter, refused: int) -> int | None:
    """Where an adapter goes when its active version `refused` is refused (see `Store.refuse_version`)."""
    rows = {v.version: v for v in adapter.versions}
    seen, target = {refused}, rows[refused].fallback_version
    while target in rows and target not in seen and rows[target].state == "refused":
        seen.add(target)
        target = rows[target].fallback_version
    if target in rows and target not in seen:
        return target
    return max((v for v, row in rows.items() if row.state == "verified"), default=None)


def _view(adapter: Adapter) -> AdapterView:
    details = tuple(VersionView(v.version, v.rank, v.size_bytes, v.source, v.created_at, v.state)
                    for v in adapter.versions)
    return AdapterView(
        tenant_id=adapter.tenant_id, name=adapter.name, active_version=adapter.active_version,
        versions=tuple(v.version for v in details), created_at=adapter.created_at, version_details=details,
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
