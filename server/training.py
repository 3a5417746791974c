"""Training files and fine-tuning jobs for a tenant: store a file, create a job, describe it to the worker.

A job's data is checked when it is created (status `validating_files`): a malformed file ends the job
`failed` at once, with the offending lines named. The worker does the rest (see `server.worker`).
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
from pathlib import Path

from fastapi import UploadFile

from adapters.names import InvalidName, check_name
from adapters.train.data import DataError, load_conversations
from server.config import Settings
from server.db import Job
from server.errors import BadRequest, ModelNotFound, PayloadTooLarge
from server.jobstore import JobStore, new_id
from server.store import Tenant
from server.training_protocol import JobCreate

BASE_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 4
_CHUNK = 1 << 20


def files_dir(settings: Settings, tenant_id: str) -> Path:
    return settings.data_dir.resolve() / "files" / check_name(tenant_id, "tenant")


def file_path(settings: Settings, tenant_id: str, file_id: str) -> Path:
    return files_dir(settings, tenant_id) / file_id


def store_file(settings: Settings, jobs: JobStore, tenant: Tenant, upload: UploadFile, purpose: str):
    """Save an uploaded training file (written whole, then renamed into place) and record it."""
    if purpose != "fine-tune":
        raise BadRequest("Only purpose 'fine-tune' is supported.", param="purpose")
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
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge("The file is larger than this server accepts.")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    filename = (upload.filename or "upload.jsonl")[:255]
    return jobs.add_file(file_id, tenant.id, filename, purpose, size)


def delete_file(settings: Settings, jobs: JobStore, tenant: Tenant, file_id: str) -> None:
    jobs.delete_file(tenant.id, file_id)
    file_path(settings, tenant.id, file_id).unlink(missing_ok=True)


def create_job(settings: Settings, jobs: JobStore, tenant: Tenant, body: JobCreate) -> Job:
    if body.model not in {settings.served_model_name, settings.base_model_id}:
        raise ModelNotFound(body.model)
    files = {"training_file": body.training_file, "validation_file": body.validation_file}
    paths = {}
    for param, file_id in files.items():
        if file_id is not None:
            jobs.get_file(tenant.id, file_id)  # 404 for a missing or another tenant's file
            paths[param] = file_path(settings, tenant.id, file_id)
    suffix = body.suffix or f"ft-{secrets.token_hex(4)}"
    try:
        check_name(suffix, "adapter")
    except InvalidName as exc:
        raise BadRequest(str(exc), param="suffix", code="invalid_name") from exc
    if suffix == "default":
        raise BadRequest("The suffix 'default' is reserved.", param="suffix", code="invalid_name")

    job = jobs.create_job(
        tenant_id=tenant.id, model=settings.served_model_name, training_file=body.training_file,
        validation_file=body.validation_file, suffix=suffix, status="validating_files",
        seed=body.seed if body.seed is not None else 0, hyperparameters={}, lora=_lora_settings(body),
    )
    try:
        train = load_conversations(paths["training_file"], role="training file")
        if "validation_file" in paths:
            load_conversations(paths["validation_file"], role="validation file")
    except DataError as exc:
        param = "validation_file" if "validation file" in str(exc) else "training_file"
        error = {"code": "invalid_training_file", "message": str(exc), "param": param}
        jobs.set_status(job.id, "failed", error=error, event=str(exc), level="error")
    else:
        jobs.set_status(job.id, "queued", hyperparameters=_hyperparameters(body, len(train)),
                        event=f"Files validated: {len(train)} training examples. Job queued.")
    return jobs.get_job(tenant.id, job.id)


def _hyperparameters(body: JobCreate, examples: int) -> dict:
    """OpenAI's hyperparameters with `auto` resolved: enough epochs for a small set to be learnt."""
    hp = body.hyperparameters
    epochs = hp.n_epochs if hp.n_epochs != "auto" else min(20, max(3, math.ceil(40 / max(1, examples))))
    batch = hp.batch_size if hp.batch_size != "auto" else min(DEFAULT_BATCH_SIZE, examples)
    multiplier = hp.learning_rate_multiplier if hp.learning_rate_multiplier != "auto" else 1.0
    return {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}


def _lora_settings(body: JobCreate) -> dict:
    fields = {"rank": body.lora_rank, "alpha": body.lora_alpha, "dropout": body.lora_dropout,
              "target_modules": body.lora_target_modules, "use_rslora": body.use_rslora,
              "loraplus_lr_ratio": body.loraplus_lr_ratio, "max_seq_len": body.max_seq_length,
              "require_improvement": body.require_improvement}
    return {k: v for k, v in fields.items() if v is not None}


def train_config(settings: Settings, job: Job, output_dir: Path) -> dict:
    """The JSON the training program (`adapters.train.job`) takes for this job."""
    hp = job.hyperparameters
    config = {
        "base_model": str(settings.model_path), "output_dir": str(output_dir),
        "train_file": str(file_path(settings, job.tenant_id, job.training_file)),
        "validation_file": str(file_path(settings, job.tenant_id, job.validation_file))
        if job.validation_file else None,
        "epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
        "learning_rate": BASE_LEARNING_RATE * hp["learning_rate_multiplier"], "seed": job.seed, **job.lora,
    }
    if "target_modules" in config:
        config["target_modules"] = list(config["target_modules"])
    return config
