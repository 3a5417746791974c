"""The database tables (SQLAlchemy 2 declarative). Queries live in `store`, `adapter_records` and `jobstore`.

Every change here needs a migration in `server/storage/migrations/versions/` (the tests compare the two).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


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
    # The tenant's file its versions are evaluated on (`server.evaluation`); None: no golden set.
    golden_set: Mapped[str | None] = mapped_column(String(64))
    # When a new version becomes active (`server.publishing.promotion`): `always`, `if_better` (than the version it
    # replaces, on the golden set), `if_better_and_retains` (and the general set's loss rises at most max_forgetting).
    promotion: Mapped[str] = mapped_column(String(32), default="always", server_default="always")
    max_forgetting: Mapped[float | None] = mapped_column(Float)
    # A candidate version taking a share of `NAME`'s requests (`server.publishing.canary`): version, weight (percent),
    # the rollback thresholds and when it started; None: the active version takes them all.
    canary: Mapped[dict | None] = mapped_column(JSON)
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
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # `verified` once an engine has loaded it, `unverified` until then, `refused` if an engine would not
    # (see `server.storage.store.Store.refuse_version`). Versions from before the column were served: verified.
    state: Mapped[str] = mapped_column(String(16), default="unverified", server_default="verified")
    # The version that was active when this one was made active unverified: where a refusal falls back to.
    fallback_version: Mapped[int | None] = mapped_column(Integer)
    # Its latest evaluation report on the adapter's golden set (`server.evaluation.runs`); None: not evaluated.
    evaluation: Mapped[dict | None] = mapped_column(JSON)
    # Set when the version waits for its evaluation to decide whether it becomes active (a job's or the CLI's
    # version of an adapter with a golden set): the time a gateway may take it up (again, if one took it and died).
    promotion_due: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    adapter: Mapped[Adapter] = relationship(back_populates="versions")


class AuditRecord(Base):
    """Who did what to which object, when, and how it ended. Never holds a secret."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    object: Mapped[str] = mapped_column(String(256))
    result: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class VersionSequence(Base):
    """The last version number given to each tenant/adapter name. Kept when the adapter is deleted, so
    a number is never reused: `NAME@N` and the engine-side name always mean one set of weights."""

    __tablename__ = "version_sequences"
    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    last: Mapped[int] = mapped_column(Integer, default=0)


class StoredFile(Base):
    """A tenant's uploaded file (training data); its bytes live under `<data_dir>/files/<tenant>/`."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A fine-tuning job. `worker_id` and `heartbeat_at` say which worker runs it and that it is alive."""

    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str] = mapped_column(String(63))
    method: Mapped[str] = mapped_column(String(16), default="supervised", server_default="supervised")  # or "dpo"
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)  # the method's; DPO's has `beta`
    lora: Mapped[dict] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32), index=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(128))
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict | None] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON)
    # The tenant's own key-value pairs (OpenAI's `metadata`; `metadata` is a reserved attribute name here).
    tags: Mapped[dict | None] = mapped_column("metadata", JSON)
    result_files: Mapped[list | None] = mapped_column(JSON, default=list)  # file ids: the metrics CSV
    # One entry per kept epoch checkpoint: {id, created_at, step_number, metrics, fine_tuned_model_checkpoint}.
    checkpoints: Mapped[list | None] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    __tablename__ = "fine_tuning_job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(32), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)
