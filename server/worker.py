"""The training worker: claims queued fine-tuning jobs and runs each in a child process.

The child (`python -m adapters.train.job CONFIG`) prints one JSON event per line; the worker turns them
into job events, keeps the job's heartbeat, kills the child's process group when the job is cancelled,
and on success publishes the adapter through the same validated path as an upload. A crash or a cancel
ends the child, never the worker. A job left `running` by a worker that died is failed by the next
worker: at once when that worker's process is gone from this host, else when its heartbeat is stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

from server.config import Settings
from server.db import Job
from server.jobstore import JobStore
from server.services import build_registry, build_store
from server.supervisor import engine_env
from server.training import train_config

log = logging.getLogger("loraserve.worker")
_HOST = socket.gethostname()


class Worker:
    def __init__(self, settings: Settings, *, poll_seconds: float = 1.0):
        self.settings = settings
        self.store = build_store(settings)
        self.jobs = JobStore(self.store)
        self.registry = build_registry(settings, self.store)
        self.id = f"{_HOST}:{os.getpid()}"
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        """Work until SIGTERM or SIGINT; a job running then goes back to the queue."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("worker %s ready", self.id)
        while not self.stopping.is_set():
            self.reap_lost_jobs()
            job = self.jobs.claim_next(self.id)
            if job is None:
                self.stopping.wait(self.poll_seconds)
            else:
                self.run_job(job)

    def reap_lost_jobs(self) -> None:
        timeout = timedelta(seconds=self.settings.worker_heartbeat_timeout)
        for job in self.jobs.running_jobs():
            if job.worker_id == self.id:
                continue
            if _process_gone(job.worker_id) or self.jobs.is_stale(job, timeout):
                self.jobs.fail_lost(job.id)
                log.warning("job %s lost its worker %s; marked failed", job.id, job.worker_id)

    def run_job(self, job: Job) -> None:
        workdir = self.settings.data_dir.resolve() / "jobs" / job.id
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            self._train(job, workdir)
        except Exception as exc:  # the worker survives whatever one job does
            log.exception("job %s failed in the worker", job.id)
            self._fail(job, "training_failed", f"The job failed: {type(exc).__name__}.")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _train(self, job: Job, workdir: Path) -> None:
        output = workdir / "adapter"
        config = train_config(self.settings, job, output)
        if self.settings.worker_threads:
            config["threads"] = self.settings.worker_threads
        (workdir / "config.json").write_text(json.dumps(config))
        self.jobs.add_event(job.id, "Training started.")
        with (workdir / "stderr.log").open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", "adapters.train.job", str(workdir / "config.json")],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=engine_env(self.settings),
                start_new_session=True,
            )
            outcome = _Outcome()
            reader = threading.Thread(target=self._read_events, args=(job, child, outcome), daemon=True)
            reader.start()
            ending = self._watch(job, child)
            reader.join(timeout=30)
        if ending == "cancelled":
            self.jobs.set_status(job.id, "cancelled", event="Job cancelled; nothing was published.")
        elif ending == "requeued":
            self.jobs.set_status(job.id, "queued", worker_id=None,
                                 event="The worker stopped; the job is queued again.")
        elif child.returncode == 0 and outcome.result is not None:
            self._publish(job, output, outcome.result)
        else:
            error = outcome.error or {"code": "training_failed", "message": "The training process stopped."}
            self._fail(job, error.get("code", "training_failed"), error.get("message", ""))

    def _watch(self, job: Job, child: subprocess.Popen) -> str:
        """Wait for the child, beating the heart; kill it on a cancel or a worker stop."""
        while child.poll() is None:
            cancel = self.jobs.heartbeat(job.id)
            if cancel or self.stopping.is_set():
                _kill_group(child)
                return "cancelled" if cancel else "requeued"
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        return "exited"

    def _read_events(self, job: Job, child: subprocess.Popen, outcome: _Outcome) -> None:
        for raw in child.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            kind, data = event.get("type"), event.get("data") or {}
            if kind == "result":
                outcome.result = data
            elif kind == "error":
                outcome.error = event
            elif kind == "step":
                loss = data.get("loss")  # null when not finite
                shown = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
                message = f"Step {data.get('step')}/{data.get('total_steps')}: training loss={shown}"
                self.jobs.set_status(job.id, "running", trained_tokens=data.get("trained_tokens"), event=message,
                                     event_type="metrics", data=data)
            elif event.get("message"):
                self.jobs.add_event(job.id, str(event["message"]), data=data or None)

    def _publish(self, job: Job, output: Path, result: dict) -> None:
        published = self.registry.publish(output, job.tenant_id, job.suffix, origin=job.id)
        model = f"{job.suffix}@{published.version}"
        self.jobs.set_status(job.id, "succeeded", fine_tuned_model=model, result=result,
                             trained_tokens=result.get("trained_tokens"),
                             event=f"Published adapter '{job.suffix}' version {published.version}; "
                             f"call it as model '{model}' (or '{job.suffix}').")
        log.info("job %s published %s/%s v%s", job.id, job.tenant_id, job.suffix, published.version)

    def _fail(self, job: Job, code: str, message: str) -> None:
        self.jobs.set_status(job.id, "failed", error={"code": code, "message": message, "param": None},
                             event=message, level="error")


class _Outcome:
    result: dict | None = None
    error: dict | None = None


def _kill_group(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _process_gone(worker_id: str | None) -> bool:
    """True when the worker that claimed a job ran on this host and its process no longer exists."""
    host, _, pid = (worker_id or "").rpartition(":")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
