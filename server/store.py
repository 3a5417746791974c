"""The database: tenants, hashed API keys, adapters and their versions (SQLAlchemy 2).

SQLite by default (WAL mode, so the CLI and a running server share the file); any SQLAlchemy URL works.
Methods are synchronous and short; async callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from adapters.names import check_name


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    default_adapter: Mapped[str | None] = mapped_column(String(63))
    limits: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A key's secret is never stored: only its SHA-256 (keys are 256-bit random, so a fast hash is
    enough). `tenant_id` is NULL for admin keys."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    active_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", order_by="AdapterVersion.version"
    )


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    adapter: Mapped[Adapter] = relationship(back_populates="versions")


@dataclass(frozen=True)
class AdapterView:
    """What the gateway needs to know of one adapter, detached from the session."""

    tenant_id: str
    name: str
    active_version: int | None
    versions: tuple[int, ...]
    created_at: datetime


@dataclass(frozen=True)
class KeyIdentity:
    key_id: str
    tenant_id: str | None  # None: an admin key

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


KEY_PREFIX = "ls"


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    def __init__(self, url: str):
        connect_args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # Tenants
    def create_tenant(self, tenant_id: str) -> Tenant:
        check_name(tenant_id, "tenant")
        try:
            with self.session() as s:
                tenant = Tenant(id=tenant_id, limits={})
                s.add(tenant)
            return tenant
        except IntegrityError as exc:
            raise ValueError(f"tenant '{tenant_id}' already exists") from exc

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self.session() as s:
            return s.get(Tenant, tenant_id)

    def list_tenants(self) -> list[Tenant]:
        with self.session() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.id)))

    # Keys
    def create_key(self, tenant_id: str | None) -> tuple[str, str]:
        """Make a key for a tenant (or an admin key when None). Returns (key id, full secret key);
        the secret exists only in the return value."""
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        with self.session() as s:
            if tenant_id is not None and s.get(Tenant, tenant_id) is None:
                raise LookupError(f"tenant '{tenant_id}' does not exist")
            s.add(ApiKey(id=key_id, tenant_id=tenant_id, secret_hash=_hash_secret(secret)))
        return key_id, secret

    def identify(self, secret: str) -> KeyIdentity | None:
        """The key's identity, or None for an unknown, malformed or revoked key. The row is found by
        the key id embedded in the key; the hash comparison is constant-time."""
        parts = secret.split("-", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        with self.session() as s:
            row = s.get(ApiKey, parts[1])
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_hash, _hash_secret(secret)):
                return None
            return KeyIdentity(row.id, row.tenant_id)

    def has_admin_key(self) -> bool:
        with self.session() as s:
            stmt = select(func.count()).select_from(ApiKey).where(
                ApiKey.tenant_id.is_(None), ApiKey.revoked_at.is_(None)
            )
            return s.scalar(stmt) > 0

    # Adapters
    def next_version(self, tenant_id: str, name: str) -> int:
        with self.session() as s:
            adapter = self._adapter(s, tenant_id, name)
            if adapter is None:
                return 1
            latest = s.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id))
            return (latest or 0) + 1

    def add_version(
        self, tenant_id: str, name: str, version: int, *, rank: int, size_bytes: int, source: str,
        activate: bool = True,
    ) -> None:
        """Record a published version; raises IntegrityError when that version number is taken."""
        with self.session() as s:
            if s.get(Tenant, tenant_id) is None:
                raise LookupError(f"tenant '{tenant_id}' does not exist")
            adapter = self._adapter(s, tenant_id, name)
            if adapter is None:
                adapter = Adapter(tenant_id=tenant_id, name=name)
                s.add(adapter)
                s.flush()
            s.add(AdapterVersion(adapter_id=adapter.id, version=version, rank=rank, size_bytes=size_bytes,
                                 source=source))
            if activate:
                adapter.active_version = version

    def get_adapter(self, tenant_id: str, name: str) -> AdapterView | None:
        with self.session() as s:
            adapter = self._adapter(s, tenant_id, name)
            return _view(adapter) if adapter else None

    def list_adapters(self, tenant_id: str) -> list[AdapterView]:
        with self.session() as s:
            rows = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.name))
            return [_view(a) for a in rows]

    def set_default_adapter(self, tenant_id: str, name: str | None) -> None:
        with self.session() as s:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise LookupError(f"tenant '{tenant_id}' does not exist")
            if name is not None and self._adapter(s, tenant_id, name) is None:
                raise LookupError(f"adapter '{name}' does not exist")
            tenant.default_adapter = name

    @staticmethod
    def _adapter(s: Session, tenant_id: str, name: str) -> Adapter | None:
        return s.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))


def _view(adapter: Adapter) -> AdapterView:
    return AdapterView(
        tenant_id=adapter.tenant_id, name=adapter.name, active_version=adapter.active_version,
        versions=tuple(v.version for v in adapter.versions), created_at=adapter.created_at,
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
