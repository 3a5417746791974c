"""Whether a new version becomes active: the adapter's promotion policy applied to the version's evaluation.

Policies (per adapter): `always` (the default: the newest version serves); `if_better`: it beats the version it
would replace (the base model, for a first version) on the golden set; `if_better_and_retains`: that, and its loss
on the general set is at most `max_forgetting` (a fraction) above the base model's.

"Beats" is first the answers: a higher similarity of its greedy answers to the references; at equal similarity, a
lower reference-answer loss. Loss alone is not enough: in this project's tests an adapter of random noise lowered
the loss on the base model's own answers (0.68 against 0.70 per token) while giving back only one of four of them.

A refused version stays published and inactive (`NAME@N` still calls it); the reason is in its report, the audit
log, and the job's events when a job made it.

Uploads are evaluated and decided in their request (`lifecycle.publish`). A job's or the CLI's version of an adapter
with a golden set is recorded waiting (`promotion_due`); every gateway's `watch_promotions` takes such versions up,
one gateway each, and a version whose gateway died is taken up again when its lease ends. An engine away, or
another evaluation of the tenant's running, puts it off for RETRY_SECONDS: no decision is made without evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from adapters.names import engine_name
from server.errors import EngineUnavailable, Missing, as_api_error
from server.evaluation import runs
from server.finetuning import results
from server.finetuning.training import file_path

if TYPE_CHECKING:  # the composition root, above this package: only its type
    from server.services import Services

log = logging.getLogger("loraserve.promotion")
POLICIES = ("always", "if_better", "if_better_and_retains")
DEFAULT_MAX_FORGETTING = 0.05
SAME_SIMILARITY = 1e-6  # similarities this close are equal (means of the same examples' scores)
LEASE_SECONDS = 1800  # an evaluation's most: a 200-example set on a loaded CPU engine
RETRY_SECONDS = 30  # after an engine away or another evaluation of the tenant's running
EVALUATION_FILENAME = "evaluation.csv"


class Busy(Exception):
    """The evaluation cannot run now (the engine is away, or another of the tenant's is running)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(policy: str, max_forgetting: float | None, report: dict) -> Decision:
    """The policy's verdict on an evaluation report (one with an `error` fails every policy but `always`)."""
    if policy == "always":
        return Decision(True, "promotion policy 'always'")
    if "error" in report:
        return Decision(False, f"policy '{policy}' needs an evaluation, and it failed: {report['error']}")
    golden = report["golden"]
    rival = "replaces" if "replaces" in golden else "base"
    ours, theirs = golden["adapter"], golden[rival]
    against = f"version {theirs['version']}" if rival == "replaces" else "the base model"
    scores = (f"similarity {ours['similarity']:.3f} and loss {ours['loss']:.4f} against {against}'s "
              f"{theirs['similarity']:.3f} and {theirs['loss']:.4f} on the golden set")
    if not _beats(ours, theirs):
        return Decision(False, f"it does not beat {against}: {scores}")
    reason = f"it beats {against}: {scores}"
    if policy == "if_better_and_retains":
        limit = DEFAULT_MAX_FORGETTING if max_forgetting is None else max_forgetting
        general = report["general"]
        rise = (general["adapter"]["loss"] - general["base"]["loss"]) / general["base"]["loss"]
        if rise > limit:
            return Decision(False, f"{reason}, but its general-set loss is {rise:.1%} above the base model's, "
                                   f"more than the {limit:.1%} allowed")
        reason += f", and its general-set loss is {rise:+.1%} from the base model's (at most {limit:.1%} allowed)"
    return Decision(True, reason)


def _beats(ours: dict, theirs: dict) -> bool:
    if abs(ours["similarity"] - theirs["similarity"]) > SAME_SIMILARITY:
        return ours["similarity"] > theirs["similarity"]
    return ours["loss"] < theirs["loss"]


async def evaluate(services: Services, tenant: str, name: str, version: int, *, wait_if_busy: bool = False
                   ) -> dict | None:
    """The version's evaluation report where the adapter has a golden set (None where not); one that could not
    be made says why (`error`), and is stored so. With `wait_if_busy`, an engine away or another evaluation of
    the tenant's running raises `Busy` instead: the caller tries again later rather than decide on no evidence."""
    adapter = await run_in_threadpool(services.store.get_adapter, tenant, name)
    if adapter is None or adapter.golden_set is None:
        return None
    try:
        return await runs.evaluate_version(services, tenant, name, version)
    except Exception as exc:
        error = as_api_error(exc)
        if wait_if_busy and (isinstance(error, EngineUnavailable) or getattr(error, "code", None) == runs.BUSY):
            raise Busy(error.message) from exc
        if error is None:
            log.exception("evaluation of %s/%s v%s failed", tenant, name, version)
        report = {"object": "adapter.evaluation", "adapter": name, "version": version,
                  "error": error.message if error else "the evaluation failed"}
        await run_in_threadpool(services.store.save_evaluation, tenant, name, version, report)
        return report


async def promote(services: Services, tenant: str, name: str, version: int, report: dict | None, source: str) -> bool:
    """Make the new `version` active as its adapter's policy says (always, where there is no report), unless a newer
    version is active already; retire what it replaces, or itself if it does not serve. Returns whether it serves."""
    store = services.store
    decision = None
    if report is not None:
        adapter = await run_in_threadpool(store.require_adapter, tenant, name)
        decision = decide(adapter.promotion, adapter.max_forgetting, report)
        report["promotion"] = {"policy": adapter.promotion, "promoted": decision.promote, "reason": decision.reason}
        await run_in_threadpool(store.save_evaluation, tenant, name, version, report)
    activated, previous = False, None
    if decision is None or decision.promote:
        activated, previous = await run_in_threadpool(store.activate_if_newer, tenant, name, version)
    if activated and previous is not None:
        services.pool.retire([engine_name(tenant, name, previous)])
    elif not activated:
        services.pool.retire([engine_name(tenant, name, version)])
    if decision is not None:
        await _tell(services, tenant, name, version, decision, activated, source)
        if source.startswith(runs.JOB_PREFIX):
            await run_in_threadpool(_show_in_job, services, tenant, source, report)
    return activated


async def watch_promotions(services: Services, interval: float) -> None:
    """Take up versions waiting for their evaluation, one at a time, for as long as the gateway runs."""
    while True:
        try:
            while (due := await run_in_threadpool(services.store.claim_due_promotion, LEASE_SECONDS)) is not None:
                await _decide_waiting(services, *due)
        except asyncio.CancelledError:
            raise
        except Exception:  # the database away for a moment: the next round tries again
            log.exception("could not take up versions waiting for their evaluation")
        await asyncio.sleep(interval)


async def _decide_waiting(services: Services, tenant: str, name: str, version: int, source: str) -> None:
    store = services.store
    adapter = await run_in_threadpool(store.get_adapter, tenant, name)
    if adapter is None or version not in adapter.versions:
        return  # deleted meanwhile, and its waiting with it
    try:
        report = await evaluate(services, tenant, name, version, wait_if_busy=True)
    except Busy as exc:
        log.info("%s/%s v%s: evaluation postponed (%s)", tenant, name, version, exc)
        await run_in_threadpool(store.schedule_promotion, tenant, name, version, RETRY_SECONDS)
        return
    except asyncio.CancelledError:  # the gateway is stopping: the next one to look takes it up at once
        store.schedule_promotion(tenant, name, version, 0)
        raise
    await promote(services, tenant, name, version, report, source)
    await run_in_threadpool(store.schedule_promotion, tenant, name, version, None)


def _show_in_job(services: Services, tenant: str, job_id: str, report: dict) -> None:
    """The report in the job that made the version: in its `result`, and as a CSV among its result files."""
    content = runs.report_csv(report).encode()
    stored = results.save_result_file(services.settings, services.jobs, tenant, content, EVALUATION_FILENAME)
    if not services.jobs.add_evaluation(job_id, report, stored.id):  # the job is gone (with its tenant)
        with contextlib.suppress(Missing):
            services.jobs.delete_file(tenant, stored.id)
        file_path(services.settings, tenant, stored.id).unlink(missing_ok=True)


async def _tell(services: Services, tenant: str, name: str, version: int, decision: Decision, activated: bool,
                source: str) -> None:
    """The decision in the audit log, and in the events of the job that made the version."""
    if decision.promote and not activated:
        outcome = f"Version {version} was not made active: a newer version is active already ({decision.reason})."
    elif decision.promote:
        outcome = f"Version {version} is active: {decision.reason}."
    else:
        outcome = f"Version {version} was not made active: {decision.reason}. It stays published (model " \
                  f"'{name}@{version}')."
    await run_in_threadpool(services.store.audit, "promotion", "adapter.promote", f"{tenant}/{name}@{version}",
                            "ok" if activated else "refused", outcome)
    if source.startswith(runs.JOB_PREFIX):
        await run_in_threadpool(services.jobs.add_event, source, outcome, level="info" if activated else "warning",
                                data={"promotion": {"promoted": activated, "reason": decision.reason}})
