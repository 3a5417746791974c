"""What a finished job leaves besides its adapter: the metrics CSV (a tenant file) and its epoch checkpoints.

The CSV has OpenAI's columns (`step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`): one row a
training step; the validation columns are filled at the end of each epoch, where the validation set (or, with
none, nothing) is measured. It is written whole to a temporary file, fsynced and renamed into place before its
row is recorded: a crash leaves the whole file or none.

Checkpoints are servable adapter versions: the last `KEPT_CHECKPOINTS` epochs' weights are published as versions
of the job's adapter, oldest first, the final one being the job's `fine_tuned_model`; each checkpoint's
`fine_tuned_model_checkpoint` is its `NAME@N`.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

from server.config import Settings
from server.finetuning.training import file_path
from server.storage.db import StoredFile, utcnow
from server.storage.jobstore import JobStore, new_id
from server.wire.timestamps import epoch

CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
RESULTS_PURPOSE = "fine-tune-results"
RESULTS_FILENAME = "step_metrics.csv"


def metrics_csv(steps: list[dict], epochs: list[dict]) -> bytes:
    """The CSV of a job's steps (`{step, loss, accuracy}` each) with the validation figures of its epochs."""
    valid = {e["step"]: e["metrics"] for e in epochs}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in steps:
        at = valid.get(row["step"], {})
        writer.writerow([row["step"], _figure(row.get("loss")), _figure(row.get("accuracy")),
                         _figure(at.get("valid_loss")), _figure(at.get("valid_mean_token_accuracy"))])
    return out.getvalue().encode()


def _figure(value) -> str:
    return f"{value:.6g}" if isinstance(value, int | float) else ""


def save_result_file(settings: Settings, jobs: JobStore, tenant_id: str, content: bytes,
                     filename: str = RESULTS_FILENAME) -> StoredFile:
    """Store `content` as one of the tenant's files (purpose `fine-tune-results`), atomically."""
    file_id = new_id("file")
    target = file_path(settings, tenant_id, file_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".result-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, target)
        return jobs.add_file(file_id, tenant_id, filename, RESULTS_PURPOSE, len(content))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise


def checkpoint_entry(job_id: str, name: str, version: int, kept: dict) -> dict:
    """The stored form of one checkpoint (`server.wire.fine_tuning.CheckpointObject` shows it)."""
    metrics = {k: float(v) for k, v in kept["metrics"].items() if isinstance(v, int | float)}
    return {"id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{kept['step']}", "created_at": epoch(utcnow()),
            "fine_tuned_model_checkpoint": f"{name}@{version}", "step_number": kept["step"], "metrics": metrics}
