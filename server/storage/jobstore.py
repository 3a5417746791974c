"""Training files, fine-tuning jobs and their events in the database.

Every read takes the tenant: another tenant's file or job reads exactly like one that does not exist.

Job states only move forward: validating_files -> queued -> running -> succeeded | failed | cancelled
(`PREDECESSORS`). Every status change is one conditional UPDATE (`... WHERE status IN <allowed
predecessors>`), never a read-modify-write, so two writers (a worker and a cancel, two workers, a reaper)
cannot both win and a finished job can never come back. Changes made for a running job also name the
worker that holds it: a worker whose job was taken from it (failed as lost, deleted with its tenant)
changes nothing. The one move back is `requeue`: a worker that is stopped gives its running job back to the
queue, to be started again from the beginning.

A job's success is recorded in the same transaction that activates its published adapter version
(`finish_published`): a cancel that lands while the worker publishes wins, the version stays inactive
and the worker withdraws it, so a job never ends `succeeded` with a half-recorded state (nor `cancelled`
with its adapter live).

Claims are atomic across processes and hosts: on PostgreSQL a worker locks the queued rows it looks at
(`FOR NO KEY UPDATE SKIP LOCKED`, so workers never wait on each other) and the claim re-checks the status.

Per-tenant quotas (stored files, their bytes, active jobs) are checked in the transaction that adds the
row, after the insert: on SQLite the insert takes the database's write lock, on PostgreSQL the tenant's
row is locked first, so two concurrent uploads cannot both squeeze under the limit.
"""

from __future__ import annotations

import secrets
from datetime import timedelta, timezone

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Missing
from server.storage.connection import ROW_LOCK, has_nul, storable
from server.storage.db import Adapter, AdapterVersion, Job, JobEvent, StoredFile, Tenant, utcnow
from server.storage.paging import keyset_page
from server.storage.store import Store

FINISHED = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
# Each status and the statuses a job may reach it from.
PREDECESSORS: dict[str, tuple[str, ...]] = {
    "queued": ("validating_files",),
    "running": ("queued",),
    "succeeded": ("running",),
    "failed": ACTIVE,
    "cancelled": ACTIVE,
}


class OverQuota(Exception):
    """Adding the file or job would pass one of the tenant's quotas (`what`: files, file_bytes, active_jobs)."""

    def __init__(self, what: str, limit: int):
        super().__init__(what)
        self.what, self.limit = what, limit


class _AdapterGone(Exception):
    """The adapter row a job was publishing into was deleted meanwhile."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStore:
    def __init__(self, store: Store):
        self._store = store

    def _session(self):
        return self._store.session()

    # Files
    def add_file(self, file_id: str, tenant_id: str, filename: str, purpose: str, size: int, *,
                 max_files: int | None = None, max_bytes: int | None = None) -> StoredFile:
        """Record a stored file; OverQuota (nothing recorded) when the tenant would pass a quota."""
        with self._session() as s:
            self._lock_tenant(s, tenant_id)
            row = StoredFile(id=file_id, tenant_id=tenant_id, filename=storable(filename), purpose=purpose,
                             bytes=size)
            s.add(row)
            s.flush()
            count, total = self._usage(s, tenant_id)
            if max_files is not None and count > max_files:
                raise OverQuota("files", max_files)
            if max_bytes is not None and total > max_bytes:
                raise OverQuota("file_bytes", max_bytes)
            return row

    def file_usage(self, tenant_id: str) -> tuple[int, int]:
        """(files, bytes) the tenant stores."""
        with self._session() as s:
            return self._usage(s, tenant_id)

    @staticmethod
    def _usage(s: Session, tenant_id: str) -> tuple[int, int]:
        count, total = s.execute(select(func.count(), func.coalesce(func.sum(StoredFile.bytes), 0))
                                 .where(StoredFile.tenant_id == tenant_id)).one()
        return int(count), int(total)

    def _lock_tenant(self, s: Session, tenant_id: str) -> None:
        """Serialize a tenant's quota checks: its row lock on PostgreSQL (SQLite's writers are serial)."""
        if self._store.is_postgres:
            s.get(Tenant, tenant_id, with_for_update=ROW_LOCK)

    def get_file(self, tenant_id: str, file_id: str) -> StoredFile:
        with self._session() as s:
            row = None if has_nul(file_id) else s.get(StoredFile, file_id)
            if row is None or row.tenant_id != tenant_id:
                raise Missing(f"No file with id '{file_id[:64]}'.")
            return row

    def list_files(self, tenant_id: str, limit: int = 10_000, after: str | None = None, *,
                   newest_first: bool = True) -> tuple[list[StoredFile], bool]:
        """A page of the tenant's files after the file `after` (Missing: not one of its files)."""
        with self._session() as s:
            cursor = None
            if after is not None:
                anchor = None if has_nul(after) else s.get(StoredFile, after)
                if anchor is None or anchor.tenant_id != tenant_id:
                    raise Missing(f"after: no file with id '{after[:64]}'.", param="after")
                cursor = (anchor.created_at, anchor.id)
            return keyset_page(s, select(StoredFile).where(StoredFile.tenant_id == tenant_id),
                               (StoredFile.created_at, StoredFile.id), limit=limit, after=cursor,
                               descending=newest_first)

    def delete_file(self, tenant_id: str, file_id: str) -> None:
        with self._session() as s:
            row = None if has_nul(file_id) else s.get(StoredFile, file_id)
            if row is None or row.tenant_id != tenant_id:
                raise Missing(f"No file with id '{file_id[:64]}'.")
            s.delete(row)

    # Jobs
    def create_job(self, *, max_active: int | None = None, **fields) -> Job:
        """A new job; OverQuota (nothing recorded) when the tenant already has `max_active` active jobs."""
        with self._session() as s:
            self._lock_tenant(s, fields["tenant_id"])
            job = Job(id=new_id("ftjob"), **fields)
            s.add(job)
            s.flush()
            if max_active is not None:
                active = s.scalar(select(func.count()).select_from(Job).where(
                    Job.tenant_id == job.tenant_id, Job.status.in_(ACTIVE)))
                if active > max_active:
                    raise OverQuota("active_jobs", max_active)
            s.add(JobEvent(job_id=job.id, type="message", message="Created fine-tuning job."))
            return job

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        with self._session() as s:
            return self._job(s, tenant_id, job_id)

    def list_jobs(self, tenant_id: str, limit: int, after: str | None = None,
                  metadata: dict[str, str] | None = None) -> tuple[list[Job], bool]:
        """The tenant's jobs, newest first; with `metadata`, only those whose metadata has every pair."""
        with self._session() as s:
            stmt = select(Job).where(Job.tenant_id == tenant_id)
            for key, value in (metadata or {}).items():
                stmt = stmt.where(Job.tags[key].as_string() == value)
            cursor = None
            if after:
                try:
                    anchor = self._job(s, tenant_id, after)
                except Missing:
                    raise Missing(f"after: no fine-tuning job with id '{after[:64]}'.", param="after") from None
                cursor = (anchor.created_at, anchor.id)
            return keyset_page(s, stmt, (Job.created_at, Job.id), limit=limit, after=cursor, descending=True)

    def set_status(self, job_id: str, status: str, *, holder: str | None = None, event: str | None = None,
                   level: str = "info", event_type: str = "message", data: dict | None = None, **fields) -> bool:
        """Move a job to `status` if it may get there from where it is (and, given `holder`, that worker
        still holds it), setting `fields`, with an optional event, in one transaction. False: nothing changed."""
        values = dict(fields, status=status)
        if status in FINISHED:
            values["finished_at"] = utcnow()
        with self._session() as s:
            if not self._move(s, job_id, PREDECESSORS[status], holder, **values):
                return False
            if event is not None:
                s.add(JobEvent(job_id=job_id, level=level, type=event_type, message=storable(event)[:2000],
                               data=data))
            return True

    def progress(self, job_id: str, holder: str, *, event: str, data: dict | None = None, **fields) -> bool:
        """Record a running job's progress (a metrics event), if `holder` still runs it."""
        with self._session() as s:
            if not self._move(s, job_id, ("running",), holder, heartbeat_at=utcnow(), **fields):
                return False
            s.add(JobEvent(job_id=job_id, type="metrics", message=storable(event)[:2000], data=data))
            return True

    def requeue(self, job_id: str, holder: str, event: str) -> bool:
        """Give a running job back to the queue (its worker is stopping), unless its cancel was asked for."""
        with self._session() as s:
            moved = s.execute(update(Job).where(
                Job.id == job_id, Job.status == "running", Job.worker_id == holder, Job.cancel_requested.is_(False),
            ).values(status="queued", worker_id=None, heartbeat_at=None, trained_tokens=None))
            if moved.rowcount != 1:
                return False
            s.add(JobEvent(job_id=job_id, message=event))
            return True

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        """Jobs not yet running are cancelled at once; a running job is flagged and its worker stops it.
        Each is one conditional UPDATE, so a cancel and a claim of the same job cannot both win."""
        with self._session() as s:
            now, mine = utcnow(), (Job.id == job_id, Job.tenant_id == tenant_id)
            cancelled = s.execute(update(Job).where(*mine, Job.status.in_(("validating_files", "queued")))
                                  .values(status="cancelled", finished_at=now))
            if cancelled.rowcount == 1:
                s.add(JobEvent(job_id=job_id, message="Job cancelled."))
            else:
                s.execute(update(Job).where(*mine, Job.status == "running").values(cancel_requested=True))
            return self._job(s, tenant_id, job_id)

    def cancel_tenant_jobs(self, tenant_id: str) -> int:
        """Cancel every active job of the tenant (before it is deleted); returns how many were active."""
        with self._session() as s:
            waiting = s.execute(update(Job).where(Job.tenant_id == tenant_id, Job.status.in_(
                ("validating_files", "queued"))).values(status="cancelled", finished_at=utcnow()))
            running = s.execute(update(Job).where(Job.tenant_id == tenant_id, Job.status == "running")
                                .values(cancel_requested=True))
            return waiting.rowcount + running.rowcount

    def claim_next(self, worker_id: str) -> Job | None:
        """Take the oldest queued job for this worker, or None. Safe against other workers and cancels."""
        with self._session() as s:
            queued = select(Job.id).where(Job.status == "queued").order_by(Job.created_at).limit(5)
            for job_id in s.scalars(queued.with_for_update(skip_locked=True, **ROW_LOCK)):
                if self._move(s, job_id, ("queued",), None, status="running", worker_id=worker_id,
                              heartbeat_at=utcnow()):
                    return s.get(Job, job_id)
        return None

    def heartbeat(self, job_id: str, holder: str) -> str:
        """Refresh the job's heartbeat: `ok`, `cancel` (its cancellation was asked for) or `gone` (the job
        is no longer this worker's to run: deleted with its tenant, failed as lost, finished)."""
        with self._session() as s:
            if not self._move(s, job_id, ("running",), holder, heartbeat_at=utcnow()):
                return "gone"
            asked = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
            return "cancel" if asked else "ok"

    def finish_published(self, job_id: str, holder: str, version: int, *, event: str, **fields) -> str:
        """Record a published job in one transaction: the job `succeeded` and its adapter version active (or, where
        the adapter has a golden set, waiting for its evaluation).
        Returns `succeeded`; else `cancelled` (a cancel was asked for meanwhile: the job is cancelled) or
        `gone` (the job is no longer this worker's, or its adapter was deleted meanwhile: then it is failed),
        and the version stays inactive for the caller to withdraw."""
        try:
            with self._session() as s:
                job = s.get(Job, job_id)
                if job is None:
                    return "gone"
                now = utcnow()
                if self._move(s, job_id, ("running",), holder, cancel_requested=False, status="succeeded",
                              finished_at=now, **fields):
                    adapter = s.execute(select(Adapter.id, Adapter.golden_set).where(
                        Adapter.tenant_id == job.tenant_id, Adapter.name == job.suffix)).first()
                    if adapter is None:
                        raise _AdapterGone  # rolls the success back
                    this = (AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == version)
                    s.add(JobEvent(job_id=job_id, message=storable(event)[:2000]))
                    if adapter.golden_set is not None:  # its evaluation decides (`server.publishing.promotion`)
                        s.execute(update(AdapterVersion).where(*this).values(promotion_due=now))
                        s.add(JobEvent(job_id=job_id, message=f"Version {version} is evaluated on the adapter's "
                                       "golden set before it serves; its promotion policy decides."))
                        return "succeeded"
                    # As `Store.activate_if_newer`: the version falls back to the one active before it if an
                    # engine refuses it, and a newer version published meanwhile stays active.
                    active = select(Adapter.active_version).where(Adapter.id == adapter.id).scalar_subquery()
                    s.execute(update(AdapterVersion).where(*this).values(fallback_version=active))
                    s.execute(update(Adapter).where(
                        Adapter.id == adapter.id,
                        or_(Adapter.active_version.is_(None), Adapter.active_version < version),
                    ).values(active_version=version))
                    return "succeeded"
                if self._move(s, job_id, ("running",), holder, cancel_requested=True, status="cancelled",
                              finished_at=now):
                    s.add(JobEvent(job_id=job_id, message="Job cancelled while its adapter was being published; "
                                   "that version was withdrawn."))
                    return "cancelled"
                return "gone"
        except _AdapterGone:
            message = "The adapter was deleted while the job was publishing it; nothing was published."
            self.set_status(job_id, "failed", holder=holder, event=message, level="error",
                            error={"code": "adapter_deleted", "message": message, "param": None})
            return "gone"

    def running_jobs(self) -> list[Job]:
        with self._session() as s:
            return list(s.scalars(select(Job).where(Job.status == "running")))

    @staticmethod
    def is_stale(job: Job, timeout: timedelta) -> bool:
        beat = job.heartbeat_at
        if beat is None:
            return True
        if beat.tzinfo is None:  # SQLite returns UTC datetimes without their zone
            beat = beat.replace(tzinfo=timezone.utc)
        return utcnow() - beat > timeout

    def fail_lost(self, job_id: str, worker_id: str | None) -> bool:
        """Fail a job whose worker (`worker_id`) died mid-job; nothing of it was published. A job that was
        meanwhile requeued or finished, or is held by another worker, is left alone."""
        message = "The worker running this job stopped before it finished; nothing was published."
        with self._session() as s:
            if not self._move(s, job_id, ("running",), worker_id, status="failed", finished_at=utcnow(),
                              error={"code": "worker_lost", "message": message, "param": None}):
                return False
            s.add(JobEvent(job_id=job_id, level="error", message=message))
            return True

    def add_evaluation(self, job_id: str, report: dict, file_id: str | None) -> bool:
        """Show the evaluation of the job's version in the job: `result.evaluation`, and its CSV among the result
        files. False when the job no longer exists."""
        with self._session() as s:
            job = s.get(Job, job_id, with_for_update=ROW_LOCK)
            if job is None:
                return False
            job.result = {**(job.result or {}), "evaluation": report}
            job.result_files = [*(job.result_files or []), *([file_id] if file_id else [])]
            return True

    # Events
    def add_event(self, job_id: str, message: str, *, level: str = "info", type_: str = "message",
                  data: dict | None = None) -> bool:
        """Add an event to a job; False when the job no longer exists (deleted with its tenant)."""
        try:
            with self._session() as s:
                if s.get(Job, job_id) is None:
                    return False
                s.add(JobEvent(job_id=job_id, level=level, type=type_, message=storable(message)[:2000],
                               data=data))
            return True
        except IntegrityError:  # the job was deleted between the check and the insert
            return False

    def list_events(self, tenant_id: str, job_id: str, limit: int, after: int | None = None
                    ) -> tuple[list[JobEvent], bool]:
        with self._session() as s:
            self._job(s, tenant_id, job_id)
            return keyset_page(s, select(JobEvent).where(JobEvent.job_id == job_id), (JobEvent.id,), limit=limit,
                               after=None if after is None else (after,), descending=True)

    def list_checkpoints(self, tenant_id: str, job_id: str, limit: int, after: str | None = None
                         ) -> tuple[list[dict], bool]:
        """A job's checkpoints, newest first (as OpenAI lists them), after the one with id `after`."""
        with self._session() as s:
            entries = sorted(self._job(s, tenant_id, job_id).checkpoints or [], key=lambda c: -c["step_number"])
        ids = [c["id"] for c in entries]
        if after is not None and after not in ids:
            raise Missing(f"after: this job has no checkpoint '{after[:64]}'.", param="after")
        start = 0 if after is None else ids.index(after) + 1
        return entries[start:start + limit], len(entries) > start + limit

    @staticmethod
    def _move(s: Session, job_id: str, sources: tuple[str, ...], holder: str | None, *,
              cancel_requested: bool | None = None, **values) -> bool:
        """The one way a job row changes: UPDATE ... WHERE status IN sources [AND worker_id = holder]
        [AND cancel_requested = ...]. True when the row changed."""
        where = [Job.id == job_id, Job.status.in_(sources)]
        if holder is not None:
            where.append(Job.worker_id == holder)
        if cancel_requested is not None:
            where.append(Job.cancel_requested.is_(cancel_requested))
        return s.execute(update(Job).where(*where).values(**values)).rowcount == 1

    @staticmethod
    def _job(s: Session, tenant_id: str, job_id: str, lock: bool = False) -> Job:
        job = None if has_nul(job_id) else s.get(Job, job_id, with_for_update=ROW_LOCK if lock else None)
        if job is None or job.tenant_id != tenant_id:
            raise Missing(f"No fine-tuning job with id '{job_id[:64]}'.")
        return job
