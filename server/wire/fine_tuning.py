"""OpenAI's shapes for files and fine-tuning jobs, with our LoRA settings as extra fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.wire.request_fields import Metadata
from server.wire.timestamps import epoch

if TYPE_CHECKING:  # rows are read by attribute; the wire layer imports no storage
    from server.storage.db import Job, JobEvent, StoredFile


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"

    @classmethod
    def of(cls, row: StoredFile) -> FileObject:
        return cls(id=row.id, bytes=row.bytes, created_at=epoch(row.created_at), filename=row.filename,
                   purpose=row.purpose)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    """DPO's: `beta` weighs how far the adapter may move from the reference model (higher: less far)."""

    beta: Annotated[float, Field(gt=0, le=2)] | Literal["auto"] = "auto"


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: `supervised` and `dpo` are run here; `reinforcement` is read so that it can be refused
    by name (`server.finetuning.training`), never run as another method."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`. `suffix` names the adapter; the lora_* fields are ours."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI: use `method`.")
    suffix: str | None = Field(None, max_length=63, description="The adapter's name (default: ft-<job>).")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    lora_rank: int | None = Field(None, ge=1, le=256)
    lora_alpha: float | None = Field(None, gt=0, le=4096)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(None, min_length=1, max_length=16)
    use_rslora: bool | None = None
    loraplus_lr_ratio: float | None = Field(None, ge=1, le=1000)
    max_seq_length: int | None = Field(None, ge=16, le=32768)
    require_improvement: bool | None = Field(
        None, description="Refuse to publish an adapter that does not beat the base model on the validation data."
    )
    method: Method | None = None
    integrations: list[Any] | None = None
    metadata: Metadata | None = None


def metadata_filter(query: list[tuple[str, str]]) -> dict[str, str]:
    """The `metadata[k]=v` pairs of a list request's query string (the openai SDK's deep-object form)."""
    return {k[len("metadata["):-1]: v for k, v in query if k.startswith("metadata[") and k.endswith("]")}


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str] = []
    status: str
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: dict[str, Any] | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = []
    suffix: str
    method: dict[str, Any]
    metadata: dict[str, str] | None = None
    lora: dict[str, Any]
    result: dict[str, Any] | None = Field(None, description="Training and evaluation figures when finished.")

    @classmethod
    def of(cls, job: Job) -> JobObject:
        return cls(
            id=job.id, model=job.model, created_at=epoch(job.created_at),
            finished_at=epoch(job.finished_at) if job.finished_at else None,
            fine_tuned_model=job.fine_tuned_model, organization_id=job.tenant_id, status=job.status,
            validation_file=job.validation_file, training_file=job.training_file,
            hyperparameters=job.hyperparameters, trained_tokens=job.trained_tokens, error=job.error,
            seed=job.seed, suffix=job.suffix, lora=job.lora, result=job.result, metadata=job.tags,
            result_files=job.result_files or [],
            method={"type": job.method, job.method: {"hyperparameters": job.hyperparameters}},
        )


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None

    @classmethod
    def of(cls, event: JobEvent) -> JobEventObject:
        return cls(id=f"ftevent-{event.id}", created_at=epoch(event.created_at), level=event.level,
                   message=event.message, type=event.type, data=event.data)


class CheckpointObject(BaseModel):
    """One kept epoch of a job: `fine_tuned_model_checkpoint` is a `model` the tenant can call (`NAME@N`)."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int

    @classmethod
    def of(cls, job_id: str, entry: dict) -> CheckpointObject:
        return cls(fine_tuning_job_id=job_id, **entry)


