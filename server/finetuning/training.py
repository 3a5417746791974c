"""Training files and fine-tuning jobs for a tenant: store a file, create a job, describe it to the worker.

A job's data is checked when it is created (status `validating_files`): a malformed file ends the job
`failed` at once, with the offending lines named. The worker does the rest (see `server.finetuning.worker`).
Each tenant stores at most `tenant_max_files` files of `tenant_max_file_bytes` bytes together, and has at
most `tenant_max_active_jobs` jobs validating, queued or running.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fastapi import UploadFile

from adapters.names import InvalidName, check_name
from adapters.train.data import DataError, count_conversations
from adapters.train.preferences import count_pairs
from server.config import Settings
from server.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, RateLimited
from server.serving.tenancy import resolve_model
from server.storage.db import Job, StoredFile
from server.storage.jobstore import JobStore, OverQuota, new_id
from server.storage.store import Tenant
from server.wire.fine_tuning import DpoHyperparameters, Hyperparameters, JobCreate

if TYPE_CHECKING:
    from server.services import Services

BASE_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 4
DEFAULT_DPO_BETA = 0.1  # OpenAI's `auto`, and the DPO paper's usual value
METHODS = {"supervised": Hyperparameters, "dpo": DpoHyperparameters}  # the fine-tuning methods run here
_CHUNK = 1 << 20
JOB_RETRY_AFTER = 60  # seconds: a short fine-tuning job's length
UPLOAD_PURPOSES = ("fine-tune", "evals")
KEPT_CHECKPOINTS = 3  # as OpenAI: the final epoch and the two before it
log = logging.getLogger("loraserve.training")


def files_dir(settings: Settings, tenant_id: str) -> Path:
    return settings.data_dir.resolve() / "files" / check_name(tenant_id, "tenant")


def file_path(settings: Settings, tenant_id: str, file_id: str) -> Path:
    return files_dir(settings, tenant_id) / file_id


def store_file(settings: Settings, jobs: JobStore, tenant: Tenant, upload: UploadFile, purpose: str):
    """Save an uploaded training file or golden set (written whole, then renamed into place) and record it,
    within the tenant's quotas: files (409), their bytes and the size of one file (413)."""
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest("Only purposes 'fine-tune' (training data) and 'evals' (a golden set) are supported.",
                         param="purpose")
    count, used = jobs.file_usage(tenant.id)
    if settings.tenant_max_files is not None and count >= settings.tenant_max_files:
        raise _over_quota(OverQuota("files", settings.tenant_max_files))
    room = settings.tenant_max_file_bytes - used if settings.tenant_max_file_bytes is not None else None
    file_id = new_id("file")
    target = file_path(settings, tenant.id, file_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            upload.file.seek(0)
            for chunk in iter(lambda: upload.file.read(_CHUNK), b""):
                size += len(chunk)
                if size > settings.max_training_file_bytes:
                    raise PayloadTooLarge(f"The file is larger than this server accepts "
                                          f"({settings.max_training_file_bytes} bytes).", param="file")
                if room is not None and size > room:
                    raise _over_quota(OverQuota("file_bytes", settings.tenant_max_file_bytes))
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, target)
        filename = (upload.filename or "upload.jsonl")[:255]
        try:
            return jobs.add_file(file_id, tenant.id, filename, purpose, size, max_files=settings.tenant_max_files,
                                 max_bytes=settings.tenant_max_file_bytes)
        except OverQuota as exc:  # another upload of the tenant's took the room meanwhile
            raise _over_quota(exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise


def delete_file(settings: Settings, jobs: JobStore, tenant: Tenant, file_id: str) -> None:
    jobs.delete_file(tenant.id, file_id)
    file_path(settings, tenant.id, file_id).unlink(missing_ok=True)


def file_content(settings: Settings, jobs: JobStore, tenant: Tenant, file_id: str) -> tuple[Path, StoredFile]:
    """Where a tenant's file's bytes are; 404 for another tenant's or a missing one."""
    row = jobs.get_file(tenant.id, file_id)
    path = file_path(settings, tenant.id, row.id)
    if not path.is_file():
        log.error("file %s of tenant %s has no bytes on disk", row.id, tenant.id)
        raise NotFound(f"No content for file '{row.id}'.")
    return path, row


def refuse_pause(jobs: JobStore, tenant: Tenant, job_id: str, action: str) -> NoReturn:
    """Pausing is not implemented: say so (after a 404 for another tenant's job), in OpenAI's error shape."""
    jobs.get_job(tenant.id, job_id)
    raise BadRequest(f"This server cannot {action} fine-tuning jobs yet; cancel the job and start a new one "
                     "(continued training can start from its adapter).", code="unsupported_operation")


def _over_quota(exc: OverQuota) -> Exception:
    """The client's error for a passed quota: it must delete files, or wait for its jobs to finish."""
    if exc.what == "files":
        return Conflict(f"This account already stores the most files allowed ({exc.limit}); delete some first.",
                        code="quota_exceeded", param="file")
    if exc.what == "file_bytes":
        return PayloadTooLarge(f"This file would take the account's stored files past the {exc.limit} bytes "
                               "allowed; delete some first.", code="quota_exceeded", param="file")
    return RateLimited(f"This account already has the most fine-tuning jobs allowed in progress ({exc.limit}); "
                       "wait for one to finish or cancel one.", code="quota_exceeded", retry_after=JOB_RETRY_AFTER)


def create_job(services: Services, tenant: Tenant, body: JobCreate) -> Job:
    """Record the job, check its files, and leave it `queued` (or `failed`, naming the bad lines)."""
    settings, jobs = services.settings, services.jobs
    method = body.method.type if body.method else "supervised"
    requested = _requested_hyperparameters(body)
    start = starting_adapter(services, tenant, body.model)
    files = {"training_file": body.training_file, "validation_file": body.validation_file}
    paths = {}
    for param, file_id in files.items():
        if file_id is not None:
            jobs.get_file(tenant.id, file_id)  # 404 for a missing or another tenant's file
            paths[param] = file_path(settings, tenant.id, file_id)
    suffix = _suffix(body, start)
    try:
        job = jobs.create_job(
            tenant_id=tenant.id, model=f"{start[0]}@{start[1]}" if start else settings.served_model_name,
            training_file=body.training_file, validation_file=body.validation_file, suffix=suffix,
            status="validating_files", seed=body.seed if body.seed is not None else 0, method=method,
            hyperparameters=requested.model_dump(), lora=_lora_settings(body), tags=body.metadata,
            max_active=settings.tenant_max_active_jobs,
        )
    except OverQuota as exc:
        raise _over_quota(exc) from None
    _validate(settings, jobs, job, requested, paths)
    return jobs.get_job(tenant.id, job.id)


def _requested_hyperparameters(body: JobCreate) -> Hyperparameters:
    """The hyperparameters asked for, from `method` or the deprecated top-level field. Supervised and DPO training
    are run: another method is refused by name, never trained as one of these."""
    method = body.method
    if method is not None and method.type not in METHODS:
        raise BadRequest(f"The fine-tuning method '{method.type}' is not supported by this server; use "
                         "'supervised' or 'dpo'.", param="method.type", code="unsupported_method")
    kind = METHODS[method.type if method else "supervised"]
    section = getattr(method, method.type) if method else None
    given = section.hyperparameters if section else None
    legacy = body.hyperparameters
    if given is not None and legacy is not None:
        clash = [k for k in given.model_fields_set & legacy.model_fields_set if getattr(given, k) != getattr(legacy, k)]
        if clash:
            raise BadRequest(f"hyperparameters.{clash[0]} differs from method.{method.type}.hyperparameters."
                             f"{clash[0]}; give the hyperparameters once, in `method`.", param="hyperparameters")
    merged = {**(legacy.model_dump(exclude_unset=True) if legacy else {}),
              **(given.model_dump(exclude_unset=True) if given else {})}
    return kind(**merged)


def starting_adapter(services: Services, tenant: Tenant, model: str) -> tuple[str, int] | None:
    """The adapter version a job continues from (`model` is one of the tenant's adapters, `NAME` or `NAME@N`),
    or None for the base model. An unknown name or another tenant's is 404 `model_not_found`."""
    settings = services.settings
    if model in {settings.served_model_name, settings.base_model_id}:
        return None
    route = resolve_model(settings, services.store, services.registry, tenant, model)
    return (route.adapter, route.version) if route.adapter is not None else None


def continued_from(settings: Settings, job: Job) -> tuple[str, int] | None:
    """The (adapter, version) a recorded job starts from; None when it starts from the base model."""
    name, sep, version = job.model.rpartition("@")  # recorded as NAME@N by `create_job`
    if job.model == settings.served_model_name or not sep or not (version.isascii() and version.isdigit()):
        return None
    return name, int(version)


def _suffix(body: JobCreate, start: tuple[str, int] | None) -> str:
    """The adapter the job publishes into: `suffix`, or the adapter it continues (whose rank and target
    modules it keeps)."""
    if start is not None:
        if body.suffix is not None and body.suffix != start[0]:
            raise BadRequest(f"Continued training publishes a new version of '{start[0]}'; leave `suffix` out or "
                             f"give '{start[0]}'.", param="suffix")
        for field in ("lora_rank", "lora_alpha", "lora_target_modules", "use_rslora"):
            if getattr(body, field) is not None:
                raise BadRequest(f"{field} is fixed by the adapter training continues from.", param=field)
        return start[0]
    suffix = body.suffix or f"ft-{secrets.token_hex(4)}"
    try:
        check_name(suffix, "adapter")
    except InvalidName as exc:
        raise BadRequest(str(exc), param="suffix", code="invalid_name") from exc
    if suffix == "default":
        raise BadRequest("The suffix 'default' is reserved.", param="suffix", code="invalid_name")
    return suffix


def _validate(settings: Settings, jobs: JobStore, job: Job, requested: Hyperparameters,
              paths: dict[str, Path]) -> None:
    """Check the job's files (streamed, one line in memory, at most max_training_file_bytes each) and move it
    to `queued` or `failed`. Whatever happens, the job does not stay in `validating_files`."""
    limit = settings.max_training_file_bytes
    count, what = (count_pairs, "preference pairs") if job.method == "dpo" else (count_conversations, "examples")
    try:
        examples = count(paths["training_file"], role="training file", max_bytes=limit)
        if "validation_file" in paths:
            count(paths["validation_file"], role="validation file", max_bytes=limit)
    except DataError as exc:
        param = "validation_file" if "validation file" in str(exc) else "training_file"
        error = {"code": "invalid_training_file", "message": str(exc), "param": param}
        jobs.set_status(job.id, "failed", error=error, event=str(exc), level="error")
    except Exception:
        log.exception("job %s: the files could not be checked", job.id)
        message = "The training file could not be checked."
        jobs.set_status(job.id, "failed", error={"code": "invalid_training_file", "message": message,
                                                 "param": "training_file"}, event=message, level="error")
    else:
        jobs.set_status(job.id, "queued", hyperparameters=_hyperparameters(requested, examples),
                        event=f"Files validated: {examples} training {what}. Job queued.")


def _hyperparameters(hp: Hyperparameters, examples: int) -> dict:
    """OpenAI's hyperparameters with `auto` resolved: enough epochs for a small set to be learnt."""
    epochs = hp.n_epochs if hp.n_epochs != "auto" else min(20, max(3, math.ceil(40 / max(1, examples))))
    batch = hp.batch_size if hp.batch_size != "auto" else min(DEFAULT_BATCH_SIZE, examples)
    multiplier = hp.learning_rate_multiplier if hp.learning_rate_multiplier != "auto" else 1.0
    resolved = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}
    if isinstance(hp, DpoHyperparameters):
        resolved["beta"] = hp.beta if hp.beta != "auto" else DEFAULT_DPO_BETA
    return resolved


def _lora_settings(body: JobCreate) -> dict:
    fields = {"rank": body.lora_rank, "alpha": body.lora_alpha, "dropout": body.lora_dropout,
              "target_modules": body.lora_target_modules, "use_rslora": body.use_rslora,
              "loraplus_lr_ratio": body.loraplus_lr_ratio, "max_seq_len": body.max_seq_length,
              "require_improvement": body.require_improvement}
    return {k: v for k, v in fields.items() if v is not None}


def train_config(settings: Settings, job: Job, output_dir: Path, init_adapter: Path | None = None) -> dict:
    """The JSON the training program (`adapters.train.job`) takes for this job: it saves the last epochs'
    checkpoints next to `output_dir`, and starts from `init_adapter`'s weights when given."""
    hp = job.hyperparameters
    config = {
        "base_model": str(settings.model_path), "output_dir": str(output_dir),
        "checkpoint_dir": str(output_dir.parent / "checkpoints"), "keep_checkpoints": KEPT_CHECKPOINTS,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "train_file": str(file_path(settings, job.tenant_id, job.training_file)),
        "validation_file": str(file_path(settings, job.tenant_id, job.validation_file))
        if job.validation_file else None,
        "epochs": hp["n_epochs"], "batch_size": hp["batch_size"], "method": job.method,
        **({"beta": hp["beta"]} if job.method == "dpo" else {}),
        "learning_rate": BASE_LEARNING_RATE * hp["learning_rate_multiplier"], "seed": job.seed, **job.lora,
    }
    if "target_modules" in config:
        config["target_modules"] = list(config["target_modules"])
    return config
