"""Canary versions: a candidate version serves a share of an adapter's requests beside its active version, and is
rolled back by itself when it does worse.

An operator starts one (`start`: version, weight in percent, thresholds) and ends it (`stop`), or promotes the
candidate by activating it (any activation ends the canary). Which version serves a request is decided in
`server.serving.canary_split`. The candidate is rolled back, and the audit log says why, when
- its error rate (answers that ended in a server error) is more than `max_error_rate_increase` above the active
  version's, once it has served `min_requests` requests (each gateway judges the requests it served), or
- its golden-set similarity is more than `max_score_drop` below the active version's: a canary is not started
  then, and one running is rolled back when a new evaluation shows it (`after_evaluation`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from adapters.names import engine_name
from server.errors import Conflict, EngineUnavailable
from server.evaluation import runs
from server.serving.tenancy import ModelRoute
from server.storage.adapter_records import AdapterView
from server.storage.db import utcnow

if TYPE_CHECKING:  # the composition root, above this package: only its type
    from server.services import Services

log = logging.getLogger("loraserve.canary")


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class CanaryWatch:
    """This gateway's counts of each running canary's answers, by version (started afresh with each canary)."""

    tallies: dict[tuple[str, str], tuple[str, dict[int, Tally]]] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)  # rollbacks under way

    def record(self, tenant: str, route: ModelRoute, ok: bool) -> str | None:
        """Count an answer of a version the split chose; the reason to roll back, when there is one now."""
        canary = route.canary
        started, by_version = self.tallies.get((tenant, route.adapter), ("", {}))
        if started != canary["started"]:
            started, by_version = canary["started"], {}
            self.tallies[tenant, route.adapter] = started, by_version
        tally = by_version.setdefault(route.version, Tally())
        tally.requests += 1
        tally.errors += not ok
        return judge_errors(canary, route.stable, by_version)

    def forget(self, tenant: str, name: str) -> None:
        self.tallies.pop((tenant, name), None)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # kept until done, or the task may be collected
        task.add_done_callback(self.tasks.discard)


def judge_errors(canary: dict, stable: int, by_version: dict[int, Tally]) -> str | None:
    candidate, active = by_version.get(canary["version"]), by_version.get(stable, Tally())
    if candidate is None or candidate.requests < canary["min_requests"]:
        return None
    if candidate.rate - active.rate <= canary["max_error_rate_increase"]:
        return None
    return (f"its error rate {candidate.rate:.1%} over {candidate.requests} requests is more than "
            f"{canary['max_error_rate_increase']:.1%} above version {stable}'s {active.rate:.1%} over "
            f"{active.requests} requests")


def judge_scores(adapter: AdapterView, canary: dict) -> str | None:
    """Why the candidate's golden-set similarity rules it out against the active version; None if it does not
    (or either has no evaluation). Compared in one report where the candidate's was made against the active
    version (the same examples), else between the two versions' own reports."""
    reports = {v.version: v.evaluation or {} for v in adapter.version_details}
    ours = reports.get(canary["version"], {}).get("golden") or {}
    stable = adapter.active_version
    theirs = ours.get("replaces") if (ours.get("replaces") or {}).get("version") == stable else \
        (reports.get(stable, {}).get("golden") or {}).get("adapter")
    if not ours.get("adapter") or not theirs:
        return None
    mine, best = ours["adapter"]["similarity"], theirs["similarity"]
    if best - mine <= canary["max_score_drop"]:
        return None
    return (f"its golden-set similarity {mine:.3f} is more than {canary['max_score_drop']:.3f} below version "
            f"{stable}'s {best:.3f}")


async def start(services: Services, tenant: str, name: str, settings: dict) -> None:
    """Start a canary (replacing a running one); 409 when its golden-set score already rules it out."""
    adapter = await run_in_threadpool(services.store.require_adapter, tenant, name)
    canary = {**settings, "started": utcnow().isoformat()}
    reason = judge_scores(adapter, canary)
    if reason is not None:
        raise Conflict(f"Version {canary['version']} was not made a canary: {reason}.", code="canary_below_stable")
    await run_in_threadpool(services.store.set_canary, tenant, name, canary)
    try:  # load it now, so the first requests the split sends it are not cold starts
        await services.pool.preload(engine_name(tenant, name, canary["version"]),
                                    str(services.registry.version_path(tenant, name, canary["version"])))
    except EngineUnavailable:
        log.warning("could not preload canary %s/%s@%s; it loads on first use", tenant, name, canary["version"])
    log.info("canary %s/%s@%s started at %s%%", tenant, name, canary["version"], canary["weight"])


async def stop(services: Services, tenant: str, name: str) -> None:
    adapter = await run_in_threadpool(services.store.require_adapter, tenant, name)
    if adapter.canary is None:
        return
    await run_in_threadpool(services.store.set_canary, tenant, name, None)
    _retire(services, tenant, name, adapter.canary)


def finished(services: Services, tenant: str, route: ModelRoute, status: int) -> None:
    """A request the split routed has ended: count it (answers and server errors only) and roll back if due."""
    if route.canary is None or not (status == 200 or status >= 500):
        return
    reason = services.canaries.record(tenant, route, status == 200)
    if reason is not None:
        services.canaries.spawn(roll_back(services, tenant, route.adapter, route.canary, reason))


async def evaluate(services: Services, tenant: str, name: str, version: int) -> dict:
    """Evaluate a version now (`runs.evaluate_version`), then judge a running canary on the new report."""
    report = await runs.evaluate_version(services, tenant, name, version)
    await after_evaluation(services, tenant, name)
    return report


async def after_evaluation(services: Services, tenant: str, name: str) -> None:
    """A version was evaluated: roll a running canary back if its candidate's score now rules it out."""
    adapter = await run_in_threadpool(services.store.require_adapter, tenant, name)
    if adapter.canary is not None and (reason := judge_scores(adapter, adapter.canary)) is not None:
        await roll_back(services, tenant, name, adapter.canary, reason)


async def roll_back(services: Services, tenant: str, name: str, canary: dict, reason: str) -> None:
    """End this canary (not a newer one), audited; the active version takes every request again."""
    ended = await run_in_threadpool(services.store.set_canary, tenant, name, None, if_started=canary["started"])
    if not ended:
        return
    services.canaries.forget(tenant, name)
    log.warning("canary %s/%s@%s rolled back: %s", tenant, name, canary["version"], reason)
    await run_in_threadpool(services.store.audit, "gateway", "adapter.canary.rollback",
                            f"{tenant}/{name}@{canary['version']}", "rolled_back", reason)
    _retire(services, tenant, name, canary)


def _retire(services: Services, tenant: str, name: str, canary: dict) -> None:
    services.pool.retire([engine_name(tenant, name, canary["version"])])  # loaded again if `NAME@N` asks
