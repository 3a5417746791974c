"""The figures the metrics collector reads at scrape time: registry size, jobs, what engines hold."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select

from server.engine.pool import EnginePool
from server.storage.db import Adapter, AdapterVersion, Job
from server.storage.store import Store
from server.wire.timestamps import epoch

EVALUATION_METRICS = ("loss", "exact_match", "similarity")
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


def metrics_state(store: Store, pool: EnginePool) -> dict:
    with store.session() as s:
        adapters = dict(s.execute(select(Adapter.tenant_id, func.count()).group_by(Adapter.tenant_id)).all())
        rows = s.execute(
            select(Adapter.tenant_id, func.count(), func.coalesce(func.sum(AdapterVersion.size_bytes), 0))
            .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id).group_by(Adapter.tenant_id)
        ).all()
        jobs = Counter(dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all()))
        tokens = s.scalar(select(func.coalesce(func.sum(Job.trained_tokens), 0)).where(Job.status == "succeeded"))
        finished = s.execute(select(Job.created_at, Job.finished_at).where(Job.finished_at.is_not(None))).all()
        evaluations = _evaluations(s)
    return {
        "engine_up": {slot.client.base_url: int(slot.up) for slot in pool.slots},
        "resident": {slot.client.base_url: len(slot.loaded) for slot in pool.slots},
        "adapters": adapters,
        "versions": {tenant: count for tenant, count, _ in rows},
        "bytes": {tenant: size for tenant, _, size in rows},
        "jobs": {status: jobs.get(status, 0) for status in JOB_STATUSES},
        "training_tokens": tokens,
        "job_count": len(finished),
        "job_seconds": float(sum(epoch(end) - epoch(start) for start, end in finished)),
        "evaluations": evaluations,
    }


def _evaluations(s) -> dict[tuple[str, ...], float]:
    """The golden-set and general-set figures of each adapter's active version and newest evaluated one (so at most
    two versions per adapter: the labels stay bounded as versions accumulate)."""
    evaluated = s.execute(select(AdapterVersion.id, Adapter.tenant_id, Adapter.name, Adapter.active_version,
                                 AdapterVersion.version).join(Adapter)
                          .where(AdapterVersion.evaluation.is_not(None))).all()
    newest: dict[tuple[str, str], int] = {}
    for row in evaluated:
        newest[row.tenant_id, row.name] = max(newest.get((row.tenant_id, row.name), 0), row.version)
    shown = [row.id for row in evaluated if row.version in (row.active_version, newest[row.tenant_id, row.name])]
    figures = {}
    for tenant, name, version, report in s.execute(
            select(Adapter.tenant_id, Adapter.name, AdapterVersion.version, AdapterVersion.evaluation)
            .join(Adapter).where(AdapterVersion.id.in_(shown))):
        for set_name in ("golden", "general"):
            for model, entry in (report.get(set_name) or {}).items():
                for metric in EVALUATION_METRICS:
                    if isinstance(entry.get(metric), int | float):
                        figures[tenant, name, str(version), set_name, model, metric] = float(entry[metric])
    return figures
