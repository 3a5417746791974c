"""Golden sets attached to adapters, and evaluations of their versions on the serving engine.

An evaluation scores the version and its baselines on the same engine that serves it, so the numbers are what the
tenant's traffic gets: on the golden set the version, the base model, the base model with few-shot examples
("would a prompt do instead?") and the version it would replace; on the general set (`adapters/train/general.jsonl`)
the version, the one it would replace and the base model, where a rise in loss is forgetting. The report is
stored with the version.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from adapters.names import engine_name
from adapters.train.data import GENERAL_SET, DataError
from server.config import Settings
from server.engine.chat_template import chat_template_for
from server.errors import BadRequest, Conflict, EngineUnavailable, Missing
from server.evaluation import evaluator
from server.evaluation.golden_set import Example, first_examples, load_golden_set
from server.finetuning.training import file_path
from server.storage.adapter_records import AdapterView, VersionView

if TYPE_CHECKING:  # the composition root, above this package: only its type
    from server.services import Services

log = logging.getLogger("loraserve.evaluation")
PURPOSES = ("evals", "fine-tune")  # the file purposes a golden set may have
BUSY = "evaluation_in_progress"  # the error code while another evaluation of the tenant's runs
JOB_PREFIX = "ftjob-"  # a version's `source` when a fine-tuning job made it
CSV_COLUMNS = ("set", "model", "version", "examples", "answer_tokens", "loss", "perplexity", "exact_match",
               "similarity", "error")


async def configure(services: Services, tenant: str, name: str, changes: dict) -> None:
    """Change `NAME`'s golden set, promotion policy or allowed forgetting (`changes`: those given). A golden set is
    checked whole first: one that cannot be evaluated is refused with its bad lines, and nothing changes."""
    await run_in_threadpool(services.store.require_adapter, tenant, name)
    if changes.get("golden_set") is not None:
        await _load(services, tenant, changes["golden_set"], param="golden_set")
    if changes:
        await run_in_threadpool(lambda: services.store.update_adapter(tenant, name, **changes))


async def evaluate_version(services: Services, tenant: str, name: str, version: int) -> dict:
    """Evaluate `version` of `NAME` on its golden set and store the report with it. One evaluation at a time
    per tenant: each costs the engine a few requests per example and model, and traffic shares that engine."""
    adapter = await run_in_threadpool(services.store.require_adapter, tenant, name)
    found = _version(adapter, version)
    if adapter.golden_set is None:
        raise Conflict(f"adapter '{name}' has no golden set; attach one first", code="no_golden_set")
    if tenant in services.evaluating:
        raise Conflict("An evaluation of this tenant's adapters is running; try again when it has finished.",
                       code=BUSY)
    services.evaluating.add(tenant)
    try:
        examples = await _load(services, tenant, adapter.golden_set)
        active = adapter.active_version
        replaces = active if active not in (None, version) else None
        started = time.monotonic()
        report = await _evaluate(services, tenant, name, found, replaces, examples)
        report.update(golden_set=adapter.golden_set, seconds=round(time.monotonic() - started, 3))
        await run_in_threadpool(services.store.save_evaluation, tenant, name, version, report)
    finally:
        services.evaluating.discard(tenant)
    log.info("evaluated %s/%s v%s on %d examples in %.1f s", tenant, name, version, len(examples), report["seconds"])
    return report


def stored_report(services: Services, tenant: str, name: str, version: int) -> dict:
    """The version's latest evaluation report; 404 when there is none (or no such version)."""
    found = _version(services.store.require_adapter(tenant, name), version)
    if found.evaluation is None:
        raise Missing(f"version {version} of adapter '{name}' has not been evaluated")
    return found.evaluation


def report_csv(report: dict) -> str:
    """The report as a table: one row per set and model."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for set_name in ("golden", "general"):
        for model, entry in report.get(set_name, {}).items():
            writer.writerow({"set": set_name, "model": model, **entry})
    return out.getvalue()


async def _load(services: Services, tenant: str, file_id: str, param: str | None = None) -> list[Example]:
    row = await run_in_threadpool(services.jobs.get_file, tenant, file_id)  # 404 for another tenant's file
    if row.purpose not in PURPOSES:
        raise BadRequest(f"File '{file_id}' has purpose '{row.purpose}'; a golden set is a file uploaded with "
                         f"purpose 'evals' or 'fine-tune'.", param=param)
    path = file_path(services.settings, tenant, row.id)
    try:
        return await run_in_threadpool(_checked_set, services, path)
    except DataError as exc:
        raise BadRequest(f"The golden set cannot be used: {exc}", param=param, code="invalid_golden_set") from exc


def _checked_set(services: Services, path: Path) -> list[Example]:
    """The set's examples, each checked to render within the engine's context (DataError names the lines)."""
    examples = load_golden_set(path)
    evaluator.render(_tokenizer(services.settings), examples,
                     max_len=services.settings.engine_max_model_len)
    return examples


def _tokenizer(settings: Settings):
    """The base model's tokenizer with the chat template the engine serves with (`chat_template_for`), so the
    conversations scored are the ones traffic sends."""
    template = chat_template_for(settings)
    return _load_tokenizer(str(settings.model_path), template and str(template))


@functools.cache
def _load_tokenizer(model_path: str, template: str | None):
    from transformers import AutoTokenizer  # heavy: imported on the first evaluation, not at start

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if template is not None:
        tokenizer.chat_template = Path(template).read_text()
    return tokenizer


async def _evaluate(services: Services, tenant: str, name: str, candidate: VersionView, replaces: int | None,
                    examples: list[Example]) -> dict:
    version = candidate.version
    max_len = services.settings.engine_max_model_len
    general = load_golden_set(GENERAL_SET, role="general set")
    tokenizer = await run_in_threadpool(_tokenizer, services.settings)

    def prepared(chosen, prompts=None):
        return run_in_threadpool(evaluator.render, tokenizer, chosen, prompts, max_len)

    golden, general_rendered = await prepared(examples), await prepared(general)
    shots = await run_in_threadpool(_training_examples, services, tenant, candidate.source)
    shown = min(evaluator.FEW_SHOT, len(shots) if shots else len(examples) - 1)
    try:
        few_shot = await prepared(examples, evaluator.few_shot_prompts(examples, shots)) if shown else None
        few_shot_error = None if few_shot else "one example and no training data: nothing to show before it"
    except DataError as exc:
        few_shot, few_shot_error = None, str(exc)
    call = evaluator.gated(functools.partial(_engine_call, services, services.cache_salts.for_tenant(tenant)))
    base = (services.settings.served_model_name, None)
    models = {"adapter": (engine_name(tenant, name, version),
                          str(services.registry.version_path(tenant, name, version)))}
    if replaces is not None:
        models["replaces"] = (engine_name(tenant, name, replaces),
                              str(services.registry.version_path(tenant, name, replaces)))

    async def scored(model: tuple[str, str | None], rendered, references, extra=None) -> dict:
        score = await evaluator.score_set(call, *model, rendered, references, max_len)
        return {**(extra or {}), **score.as_dict()}

    answers, facts = [e.answer for e in examples], [e.answer for e in general]
    jobs = {
        ("golden", "adapter"): scored(models["adapter"], golden, answers, {"version": version}),
        ("golden", "base"): scored(base, golden, answers),
        ("general", "adapter"): scored(models["adapter"], general_rendered, facts, {"version": version}),
        ("general", "base"): scored(base, general_rendered, facts),
    }
    if few_shot:
        jobs["golden", "few_shot"] = scored(base, few_shot, answers,
                                            {"shots": shown, "from": "training_file" if shots else "golden_set"})
    if replaces is not None:
        jobs["golden", "replaces"] = scored(models["replaces"], golden, answers, {"version": replaces})
        jobs["general", "replaces"] = scored(models["replaces"], general_rendered, facts, {"version": replaces})
    results = dict(zip(jobs, await evaluator.all_or_none(jobs.values()), strict=True))
    report: dict = {"object": "adapter.evaluation", "adapter": name, "version": version, "examples": len(examples),
                    "created_at": int(time.time()), "golden": {}, "general": {}}
    for (set_name, model), entry in sorted(results.items(), key=lambda item: _ORDER.index(item[0][1])):
        report[set_name][model] = entry
    if few_shot_error:
        report["golden"]["few_shot"] = {"error": few_shot_error}
    return report


_ORDER = ("adapter", "replaces", "base", "few_shot")


def _version(adapter: AdapterView, version: int) -> VersionView:
    found = next((v for v in adapter.version_details if v.version == version), None)
    if found is None:
        raise Missing(f"adapter '{adapter.name}' has no version {version}")
    return found


def _training_examples(services: Services, tenant: str, source: str) -> list[Example] | None:
    """The first solved examples of the training file of the job that made the version (its `source`): the few-shot
    baseline shows the base model what the adapter learnt from. None for a version no job made, or whose file is
    gone."""
    if not source.startswith(JOB_PREFIX):
        return None
    try:
        job = services.jobs.get_job(tenant, source)
        row = services.jobs.get_file(tenant, job.training_file)
        shots = first_examples(file_path(services.settings, tenant, row.id), evaluator.FEW_SHOT,
                               preferences=job.method == "dpo")
    except (Missing, OSError):
        return None
    return shots or None


async def _engine_call(services: Services, cache_salt: str, model: str, adapter_path: str | None, path: str,
                       payload: dict) -> dict:
    """One request of an evaluation, placed like traffic (the base through its stand-in where there is one), with
    the tenant's cache salt: its golden set's prompts share no cached prefix with another tenant's requests."""
    if adapter_path is None and services.pool.base_stand_in is not None:
        model, adapter_path = services.pool.base_stand_in
    slot, _ = await services.pool.acquire(model, adapter_path)
    try:
        reply = await slot.client.complete(path, {**payload, "model": model, "cache_salt": cache_salt})
    finally:
        services.pool.release(slot, model)
    if reply.status != 200:
        log.warning("evaluation request for %s answered %s: %s", model, reply.status, reply.body[:300])
        raise EngineUnavailable(f"The inference engine refused an evaluation request ({reply.status}); "
                                "nothing was stored.")
    return reply.json()
