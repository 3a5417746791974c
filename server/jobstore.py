"""Training files, fine-tuning jobs and their events in the database.

Every read takes the tenant: another tenant's file or job reads exactly like one that does not exist.
Job states: validating_files -> queued -> running -> succeeded | failed | cancelled. A worker claims a
queued job atomically and keeps a heartbeat; a job whose worker died is failed (see `server.worker`).
Claims are atomic across processes and hosts too: on PostgreSQL a worker locks the queued rows it looks at
(`FOR NO KEY UPDATE SKIP LOCKED`, so workers never wait on each other) and the claim re-checks the status.
"""

from __future__ import annotations

import secrets
from datetime import timedelta, timezone

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.db import Job, JobEvent, StoredFile, utcnow
from server.store import ROW_LOCK, Missing, Store, has_nul, storable

FINISHED = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStore:
    def __init__(self, store: Store):
        self._store = store

    def _session(self):
        return self._store.session()

    # Files
    def add_file(self, file_id: str, tenant_id: str, filename: str, purpose: str, size: int) -> StoredFile:
        with self._session() as s:
            row = StoredFile(id=file_id, tenant_id=tenant_id, filename=storable(filename), purpose=purpose,
                             bytes=size)
            s.add(row)
            return row

    def get_file(self, tenant_id: str, file_id: str) -> StoredFile:
        with self._session() as s:
            row = None if has_nul(file_id) else s.get(StoredFile, file_id)
            if row is None or row.tenant_id != tenant_id:
                raise Missing(f"No file with id '{file_id[:64]}'.")
            return row

    def list_files(self, tenant_id: str) -> list[StoredFile]:
        with self._session() as s:
            return list(s.scalars(select(StoredFile).where(StoredFile.tenant_id == tenant_id)
                                  .order_by(StoredFile.created_at.desc())))

    def delete_file(self, tenant_id: str, file_id: str) -> None:
        with self._session() as s:
            row = None if has_nul(file_id) else s.get(StoredFile, file_id)
            if row is None or row.tenant_id != tenant_id:
                raise Missing(f"No file with id '{file_id[:64]}'.")
            s.delete(row)

    # Jobs
    def create_job(self, **fields) -> Job:
        with self._session() as s:
            job = Job(id=new_id("ftjob"), **fields)
            s.add(job)
            s.flush()
            s.add(JobEvent(job_id=job.id, type="message", message="Created fine-tuning job."))
            return job

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        with self._session() as s:
            return self._job(s, tenant_id, job_id)

    def list_jobs(self, tenant_id: str, limit: int, after: str | None = None) -> tuple[list[Job], bool]:
        with self._session() as s:
            stmt = select(Job).where(Job.tenant_id == tenant_id).order_by(Job.created_at.desc(), Job.id.desc())
            if after:
                anchor = self._job(s, tenant_id, after)
                stmt = stmt.where(Job.created_at <= anchor.created_at, Job.id != anchor.id)
            rows = list(s.scalars(stmt.limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    def set_status(self, job_id: str, status: str, *, event: str | None = None, level: str = "info",
                   event_type: str = "message", data: dict | None = None, **fields) -> None:
        """Move a job to `status`, setting `fields`, with an optional event, in one transaction."""
        with self._session() as s:
            job = s.get(Job, job_id)
            job.status = status
            for name, value in fields.items():
                setattr(job, name, value)
            if status in FINISHED:
                job.finished_at = utcnow()
            if event is not None:
                s.add(JobEvent(job_id=job_id, level=level, type=event_type, message=storable(event)[:2000],
                               data=data))

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        """Queued jobs are cancelled at once; a running job is flagged and its worker stops it."""
        with self._session() as s:
            job = self._job(s, tenant_id, job_id, lock=True)  # a worker cannot claim it meanwhile
            if job.status in FINISHED:
                return job
            if job.status == "running":
                job.cancel_requested = True
            else:
                job.status, job.finished_at = "cancelled", utcnow()
                s.add(JobEvent(job_id=job.id, message="Job cancelled."))
            return job

    def claim_next(self, worker_id: str) -> Job | None:
        """Take the oldest queued job for this worker, or None. Safe against other workers."""
        with self._session() as s:
            queued = select(Job.id).where(Job.status == "queued").order_by(Job.created_at).limit(5)
            for job_id in s.scalars(queued.with_for_update(skip_locked=True, **ROW_LOCK)):
                claimed = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
                    status="running", worker_id=worker_id, heartbeat_at=utcnow()))
                if claimed.rowcount == 1:
                    return s.get(Job, job_id)
        return None

    def heartbeat(self, job_id: str) -> bool:
        """Refresh the job's heartbeat; True when its cancellation was asked for."""
        with self._session() as s:
            job = s.get(Job, job_id)
            job.heartbeat_at = utcnow()
            return job.cancel_requested

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

    def fail_lost(self, job_id: str) -> None:
        """Fail a job whose worker died mid-job; nothing of it was published."""
        message = "The worker running this job stopped before it finished; nothing was published."
        with self._session() as s:
            job = s.get(Job, job_id, with_for_update=ROW_LOCK)  # two workers reaping it fail it once
            if job is None or job.status != "running":
                return
            job.status, job.finished_at = "failed", utcnow()
            job.error = {"code": "worker_lost", "message": message, "param": None}
            s.add(JobEvent(job_id=job.id, level="error", message=message))

    # Events
    def add_event(self, job_id: str, message: str, *, level: str = "info", type_: str = "message",
                  data: dict | None = None) -> None:
        with self._session() as s:
            s.add(JobEvent(job_id=job_id, level=level, type=type_, message=storable(message)[:2000], data=data))

    def list_events(self, tenant_id: str, job_id: str, limit: int, after: int | None = None
                    ) -> tuple[list[JobEvent], bool]:
        with self._session() as s:
            self._job(s, tenant_id, job_id)
            stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
            if after is not None:
                stmt = stmt.where(JobEvent.id < after)
            rows = list(s.scalars(stmt.limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    @staticmethod
    def _job(s: Session, tenant_id: str, job_id: str, lock: bool = False) -> Job:
        job = None if has_nul(job_id) else s.get(Job, job_id, with_for_update=ROW_LOCK if lock else None)
        if job is None or job.tenant_id != tenant_id:
            raise Missing(f"No fine-tuning job with id '{job_id[:64]}'.")
        return job

