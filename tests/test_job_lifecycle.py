"""A job's life in the worker and the job store, on a real SQLite file with real child processes.

The training program is replaced by a small stand-in child (so no model is trained), started through the
worker's own `subprocess.Popen` call; everything else is the real worker, job store and registry. Each test
says what it guards; each failed on the code before issue 12's fixes (commit 78457a3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from server.config import Settings
from server.finetuning import worker as worker_module
from server.finetuning.worker import Worker, child_env, scrub
from server.storage.db import Job, utcnow
from server.storage.jobstore import JobStore
from tests.conftest import REPO, make_peft_adapter

# The stand-in for `python -m adapters.train.job CONFIG`: argv is CONFIG CONTROL_DIR MODE. It writes its pid to
# CONTROL_DIR/child.pid, reports like the real program (paths in its messages, as the real one did), then
# `sleep`s for an hour, or (`publish`) waits for CONTROL_DIR/go, reports a step and saves CONTROL_DIR/adapter.
STAND_IN = r"""
import json, os, shutil, sys, time
from pathlib import Path
config, control, mode = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3]
(control / "child.tmp").write_text(str(os.getpid()))
os.rename(control / "child.tmp", control / "child.pid")
def event(**e):
    print(json.dumps(e), flush=True)
event(type="loading", message=f"Loading the base model from {config['base_model']}", data={})
if mode == "sleep":
    time.sleep(3600)
while not (control / "go").exists():
    time.sleep(0.05)
event(type="step", message="Step 1/1", data={"step": 1, "total_steps": 1, "loss": 1.0, "trained_tokens": 10})
shutil.copytree(control / "adapter", config["output_dir"])
event(type="done", message=f"Adapter saved to {config['output_dir']}", data={"where": config["output_dir"]})
event(type="result", data={"trained_tokens": 10, "steps": 1})
"""

# A worker process that runs one claimed job with the stand-in child: argv is DATA_DIR CONTROL_DIR.
WORKER = r"""
import subprocess, sys
from server.finetuning import worker as w
from server.config import Settings
real = subprocess.Popen
subprocess.Popen = lambda args, **kw: real([sys.executable, "-c", sys.argv[3], args[-1], sys.argv[2], "sleep"], **kw)
settings = Settings(_env_file=None, data_dir=sys.argv[1], base_model_path=sys.argv[1] + "/no-model")
worker = w.Worker(settings)
worker.run_job(worker.jobs.claim_next(worker.id))
"""

LIVENESS_TIMEOUT = 120  # generous: only ever waited out when something is wrong


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (one whose parent died may wait a while to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, what: str, timeout: float = LIVENESS_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", base_model_path=tmp_path / "no-model")


@pytest.fixture
def control(tmp_path) -> Path:
    folder = tmp_path / "control"
    folder.mkdir()
    return folder


def stand_in(monkeypatch, control: Path, mode: str) -> None:
    """Make the worker start the stand-in child instead of the training program."""
    real = subprocess.Popen

    def popen(args, **kwargs):
        return real([sys.executable, "-c", STAND_IN, args[-1], str(control), mode], **kwargs)

    monkeypatch.setattr(worker_module.subprocess, "Popen", popen)


def child_pid(control: Path) -> int:
    return int(wait_for(lambda: (control / "child.pid").exists() and (control / "child.pid").read_text(),
                        "the child to start"))


def queued_job(worker: Worker, tenant: str = "acme", suffix: str = "bot") -> Job:
    if worker.store.get_tenant(tenant) is None:
        worker.store.create_tenant(tenant)
    worker.jobs.create_job(tenant_id=tenant, model="m", training_file="file-x", suffix=suffix, status="queued",
                           hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
                           lora={})
    job = worker.jobs.claim_next(worker.id)
    assert job is not None
    return job


class Background(threading.Thread):
    """`worker.run_job(job)` in a thread, keeping what it raised."""

    def __init__(self, worker: Worker, job: Job):
        super().__init__(daemon=True)
        self.worker, self.job, self.error = worker, job, None

    def run(self):
        try:
            self.worker.run_job(self.job)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(LIVENESS_TIMEOUT)
        assert not self.is_alive(), "run_job did not return"
        assert self.error is None, f"run_job raised {self.error!r}"


def status(worker: Worker, job: Job) -> Job:
    return worker.jobs.get_job(job.tenant_id, job.id)


# --- the child never outlives its job (item 8) ---------------------------------------------------------------------


def test_an_error_in_the_worker_kills_the_child(settings, control, monkeypatch):
    """Guards: whatever way the worker leaves a job, its child dies. Failed before the fix: an exception in the
    worker (here the database failing the heartbeat) failed the job but left the training child running."""
    stand_in(monkeypatch, control, "sleep")
    worker = Worker(settings)
    job = queued_job(worker)

    def broken(*_args, **_kwargs):
        child_pid(control)  # the child is up and running
        raise RuntimeError("database went away")

    monkeypatch.setattr(worker.jobs, "heartbeat", broken)
    worker.run_job(job)
    pid = child_pid(control)
    wait_for(lambda: not alive(pid), "the child to die")
    assert status(worker, job).status == "failed"


def test_the_child_gets_no_secrets(settings, control, monkeypatch):
    """Guards: a training child inherits neither the admin key nor the database URL (nor other credentials).
    Failed before the fix: the child's environment was a copy of the worker's, LORASERVE_* included."""
    for name, value in {"LORASERVE_ADMIN_KEY": "admin-secret", "LORASERVE_DATABASE_URL": "postgresql://u:pw@db/x",
                        "PGPASSWORD": "pw", "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(name, value)
    stand_in(monkeypatch, control, "sleep")
    worker = Worker(settings)
    job = queued_job(worker)
    running = Background(worker, job)
    running.start()
    pid = child_pid(control)
    environ = dict(entry.split("=", 1) for entry in
                   Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in entry)
    worker.jobs.request_cancel(job.tenant_id, job.id)
    running.finish()
    assert not {"LORASERVE_ADMIN_KEY", "LORASERVE_DATABASE_URL", "PGPASSWORD"} & set(environ), sorted(environ)
    assert not [v for v in environ.values() if "admin-secret" in v or "pw@db" in v]
    assert environ["OMP_NUM_THREADS"] == "2" and environ["HF_HUB_OFFLINE"] == "1"  # what training needs stays
    assert status(worker, job).status == "cancelled" and not alive(pid)


def test_child_env_is_an_allow_list():
    env = child_env({"PATH": "/bin", "HOME": "/h", "LORASERVE_ADMIN_KEY": "k", "LORASERVE_DATABASE_URL": "u",
                     "AWS_SECRET_ACCESS_KEY": "s", "CUDA_VISIBLE_DEVICES": "0", "LC_ALL": "C.UTF-8"})
    assert {"PATH", "HOME", "CUDA_VISIBLE_DEVICES", "LC_ALL", "PYTHONPATH", "HF_HUB_OFFLINE"} <= set(env)
    assert not {"LORASERVE_ADMIN_KEY", "LORASERVE_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_a_dying_worker_takes_its_child_with_it(settings, control):
    """Guards: a worker killed outright (SIGKILL, OOM) does not leave its training child running. Failed before
    the fix: the child ran in its own session with nothing tying it to the worker, and kept training."""
    worker = Worker(settings)  # only to set up the database the worker process will use
    worker.store.create_tenant("acme")
    worker.jobs.create_job(tenant_id="acme", model="m", training_file="file-x", suffix="bot", status="queued",
                           hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
                           lora={})
    process = subprocess.Popen([sys.executable, "-c", WORKER, str(settings.data_dir), str(control), STAND_IN],
                               cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        pid = child_pid(control)
        assert alive(pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    try:
        wait_for(lambda: not alive(pid), "the orphaned child to die")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_deleting_the_tenant_of_a_running_job(settings, control, monkeypatch):
    """Guards: the worker copes with a job whose tenant (and so the job's row) vanishes mid-run: it stops the
    child and goes on. Failed before the fix: the heartbeat crashed on the missing row, failing the job crashed
    again, run_job raised (the worker process died) and the child was orphaned."""
    stand_in(monkeypatch, control, "sleep")
    worker = Worker(settings)
    job = queued_job(worker)
    running = Background(worker, job)
    running.start()
    pid = child_pid(control)
    worker.store.delete_tenant("acme")
    running.finish()
    assert not alive(pid)
    assert worker.jobs.claim_next(worker.id) is None  # the worker's database work still works


# --- status only moves forward (item 9) ----------------------------------------------------------------------------


@pytest.fixture
def adapter_source(base_model_path, control) -> Path:
    return make_peft_adapter(base_model_path, control / "adapter", seed=7)


@pytest.fixture
def real_settings(tmp_path, base_model_path) -> Settings:
    """Settings whose base model is the real one, so that the registry can validate a published adapter."""
    return Settings(_env_file=None, data_dir=tmp_path / "data", base_model_path=base_model_path)


def test_a_job_failed_meanwhile_never_comes_back(real_settings, control, adapter_source, monkeypatch):
    """Guards: once a job is failed (here by a reaper that judged its worker lost), its still-running worker
    can neither bring it back to `running` with a progress step nor publish it. Failed before the fix: the step
    wrote `running` unconditionally, then the job was published and ended `succeeded`."""
    stand_in(monkeypatch, control, "publish")
    worker = Worker(real_settings)
    job = queued_job(worker)
    running = Background(worker, job)
    running.start()
    child_pid(control)
    with worker.store.session() as s:  # what a reaper does: the job's worker looked dead
        s.execute(update(Job).where(Job.id == job.id).values(
            status="failed", finished_at=utcnow(), error={"code": "worker_lost", "message": "lost", "param": None}))
    (control / "go").touch()
    running.finish()
    done = status(worker, job)
    assert done.status == "failed" and done.error["code"] == "worker_lost" and done.fine_tuned_model is None
    adapter = worker.store.get_adapter("acme", "bot")
    assert adapter is None or adapter.active_version is None
    assert not list((real_settings.registry_path / "acme").glob("bot/*"))


def test_a_cancel_during_publishing_wins(real_settings, control, adapter_source, monkeypatch):
    """Guards the publish-then-record window: a cancel that lands after the adapter's files are published but
    before the job's success is recorded ends the job `cancelled`, with the version withdrawn, never active.
    Failed before the fix: the job ended `succeeded` with its cancel ignored."""
    stand_in(monkeypatch, control, "publish")
    (control / "go").touch()
    worker = Worker(real_settings)
    job = queued_job(worker)
    publish = worker.registry.publish

    def publish_then_cancel(*args, **kwargs):
        published = publish(*args, **kwargs)
        assert worker.jobs.request_cancel(job.tenant_id, job.id).status == "running"  # flagged, not yet over
        return published

    monkeypatch.setattr(worker.registry, "publish", publish_then_cancel)
    worker.run_job(job)
    done = status(worker, job)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    assert worker.store.get_adapter("acme", "bot") is None
    assert not list((real_settings.registry_path / "acme").glob("bot/*"))
    assert worker.jobs.list_files("acme")[0] == [] and not done.result_files  # the metrics file went with it
    assert not [p for p in (real_settings.data_dir / "files" / "acme").iterdir()]


def test_a_published_job_succeeds_with_its_version_active(real_settings, control, adapter_source, monkeypatch):
    """The good path through the same window, and no server path in what the tenant reads."""
    stand_in(monkeypatch, control, "publish")
    (control / "go").touch()
    worker = Worker(real_settings)
    job = queued_job(worker)
    worker.run_job(job)
    done = status(worker, job)
    assert done.status == "succeeded" and done.fine_tuned_model == "bot@1"
    assert worker.store.get_adapter("acme", "bot").active_version == 1
    [result] = done.result_files  # the metrics CSV, one of the tenant's files, written whole
    assert worker.jobs.get_file("acme", result).purpose == "fine-tune-results"
    csv = (real_settings.data_dir / "files" / "acme" / result).read_text()
    assert csv == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,1,,,\n"
    events, _ = worker.jobs.list_events("acme", job.id, 100)
    shown = json.dumps([[e.message, e.data] for e in events])
    assert "Adapter saved to <path>" in shown and "Loading the base model from <path>" in shown
    for secret in (str(real_settings.data_dir.resolve()), str(real_settings.model_path), str(REPO)):
        assert secret not in shown


def test_cancel_and_claim_never_both_win(settings):
    """Guards the SQLite cancel/claim race: a job is either cancelled while queued (and never handed to a
    worker) or claimed (and then only flagged for cancellation); no cancel or claim errors out."""
    store_jobs = JobStore(Worker(settings).store)
    store_jobs._store.create_tenant("acme")
    ids = [store_jobs.create_job(tenant_id="acme", model="m", training_file="f", suffix=f"s{i}",
                                 status="queued").id for i in range(60)]
    claimed, errors = [], []

    def claim():
        try:
            while (job := store_jobs.claim_next("w:1")) is not None:
                claimed.append(job.id)
        except Exception as exc:
            errors.append(exc)

    def cancel():
        try:
            for job_id in reversed(ids):
                store_jobs.request_cancel("acme", job_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim), threading.Thread(target=cancel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LIVENESS_TIMEOUT)
    assert not errors, errors
    for job_id in ids:
        job = store_jobs.get_job("acme", job_id)
        if job_id in claimed:
            assert job.status == "running" and job.cancel_requested, job_id
        else:
            assert job.status == "cancelled", job_id


def test_the_state_machine_refuses_to_go_back(settings):
    jobs = JobStore(Worker(settings).store)
    jobs._store.create_tenant("acme")
    job = jobs.create_job(tenant_id="acme", model="m", training_file="f", suffix="s", status="validating_files")
    assert not jobs.set_status(job.id, "running")  # must be queued first
    assert jobs.set_status(job.id, "queued") and jobs.claim_next("w:1").id == job.id
    assert not jobs.progress(job.id, "w:2", event="not mine")  # only its worker reports progress
    assert jobs.heartbeat(job.id, "w:2") == "gone" and jobs.heartbeat(job.id, "w:1") == "ok"
    assert jobs.set_status(job.id, "failed", holder="w:1")
    for later in ("queued", "running", "succeeded", "cancelled", "failed"):
        assert not jobs.set_status(job.id, later)
    assert not jobs.fail_lost(job.id, "w:1") and not jobs.requeue(job.id, "w:1", "again")
    assert jobs.request_cancel("acme", job.id).status == "failed"


def test_scrub_hides_paths_but_not_numbers():
    assert scrub("Adapter saved to /srv/data/jobs/ftjob-1/adapter after 3 steps") == \
        "Adapter saved to <path> after 3 steps"
    assert scrub({"m": "FileNotFoundError: '/x/y.json'", "n": [1, "Step 1/3", "n/a"]}) == \
        {"m": "FileNotFoundError: '<path>'", "n": [1, "Step 1/3", "n/a"]}
