"""The training worker: claims queued fine-tuning jobs and runs each in a child process.

The child (`python -m adapters.train.job CONFIG`) prints one JSON event per line; the worker turns them
into job events, keeps the job's heartbeat, and on success publishes the adapter through the same validated
path as an upload. A crash or a cancel ends the child, never the worker.

The child never outlives the job: whatever way the worker leaves it (done, cancelled, the job deleted with
its tenant, an error in the worker), its process group is killed (`try/finally`); and if the worker itself
dies, the kernel kills the child (Linux `PR_SET_PDEATHSIG`, set in the child before it runs the program).
The child gets only the environment it needs (`child_env`): no admin key, no database URL.

Every status change is conditional on the job still being this worker's and in the state it expects (see
`server.storage.jobstore`): a job cancelled, failed as lost, or deleted meanwhile is not brought back. A job left
`running` by a worker that died is failed by the next worker: at once when that worker's process is gone
from this host, else when its heartbeat is stale.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

from server.config import Settings
from server.finetuning import results
from server.finetuning.training import continued_from, file_path, train_config
from server.storage.db import Job
from server.storage.factory import build_registry, build_store
from server.storage.jobstore import JobStore
from server.storage.store import OverQuota

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
        self.child: subprocess.Popen | None = None  # the running job's process, while there is one

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
            if (_process_gone(job.worker_id) or self.jobs.is_stale(job, timeout)) \
                    and self.jobs.fail_lost(job.id, job.worker_id):
                log.warning("job %s lost its worker %s; marked failed", job.id, job.worker_id)

    def run_job(self, job: Job) -> None:
        """Run one claimed job to its end. Never raises: the worker survives whatever one job does."""
        workdir = self.settings.data_dir.resolve() / "jobs" / job.id
        try:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            self._train(job, workdir)
        except OverQuota as exc:  # publishing would pass the tenant's adapter quota; its message says which
            self._fail(job, "quota_exceeded", f"Nothing was published: {exc}")
        except Exception as exc:
            log.exception("job %s failed in the worker", job.id)
            self._fail(job, "training_failed", f"The job failed: {type(exc).__name__}.")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def child_command(self, config_path: Path) -> list[str]:
        """The training program for one job (tests put a stand-in here)."""
        return [sys.executable, "-m", "adapters.train.job", str(config_path)]

    def _train(self, job: Job, workdir: Path) -> None:
        output = workdir / "adapter"
        start = continued_from(self.settings, job)
        init = self.registry.version_path(job.tenant_id, *start) if start else None
        if init is not None and not init.is_dir():
            self._fail(job, "model_not_found", f"The adapter version '{job.model}' this job continues from no "
                       "longer exists; nothing was trained.")
            return
        config = train_config(self.settings, job, output, init)
        if self.settings.worker_threads:
            config["threads"] = self.settings.worker_threads
        (workdir / "config.json").write_text(json.dumps(config))
        self.jobs.add_event(job.id, "Training started.")
        outcome = _Outcome()
        with (workdir / "stderr.log").open("wb") as stderr:
            self.child = child = subprocess.Popen(
                self.child_command(workdir / "config.json"), stdout=subprocess.PIPE, stderr=stderr,
                stdin=subprocess.DEVNULL, env=child_env(), cwd=workdir, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
            reader = threading.Thread(target=self._read_events, args=(job, child, outcome), daemon=True)
            try:
                reader.start()
                ending = self._watch(job, child)
            finally:  # whatever happened above, the child does not outlive the job
                _kill_group(child)
                self.child = None
                reader.join(timeout=30)  # the pipe ends with the child's group
                child.stdout.close()
        if ending == "exited":  # a cancel or the job's loss may have come while the child was finishing
            beat = self.jobs.heartbeat(job.id, self.id)
            ending = {"cancel": "cancelled", "gone": "gone"}.get(beat, ending)
        if ending == "cancelled":
            self.jobs.set_status(job.id, "cancelled", holder=self.id, event="Job cancelled; nothing was published.")
        elif ending == "requeued":
            if not self.jobs.requeue(job.id, self.id, "The worker stopped; the job is queued again."):
                self.jobs.set_status(job.id, "cancelled", holder=self.id, event="Job cancelled; nothing was published.")
        elif ending == "gone":
            log.warning("job %s was taken from this worker (deleted, or failed as lost); stopped it", job.id)
        elif child.returncode == 0 and outcome.result is not None:
            self._publish(job, workdir, outcome)
        else:
            error = outcome.error or {"code": "training_failed", "message": "The training process stopped."}
            self._fail(job, str(error.get("code", "training_failed")), scrub(str(error.get("message", ""))))

    def _watch(self, job: Job, child: subprocess.Popen) -> str:
        """Wait for the child, beating the heart; stop it on a cancel, a worker stop or the job's loss."""
        while child.poll() is None:
            beat = self.jobs.heartbeat(job.id, self.id)
            if beat == "cancel":
                return "cancelled"
            if beat == "gone":
                return "gone"
            if self.stopping.is_set():
                return "requeued"
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        return "exited"

    def _read_events(self, job: Job, child: subprocess.Popen, outcome: _Outcome) -> None:
        """Turn the child's JSON lines into events. Reads to the end whatever one event does, so that the
        child never blocks on a full pipe."""
        for raw in child.stdout:
            try:
                self._on_event(job, json.loads(raw), outcome)
            except Exception:  # a malformed line or a database hiccup: that one event is lost, not the job
                log.debug("job %s: event not recorded", job.id, exc_info=True)

    def _on_event(self, job: Job, event: dict, outcome: _Outcome) -> None:
        kind, data = event.get("type"), scrub(event.get("data") or {})
        if kind == "result":
            outcome.result = data
        elif kind == "error":
            outcome.error = event
        elif kind == "checkpoint":
            outcome.epochs.append(data)
            self.jobs.add_event(job.id, scrub(str(event.get("message", ""))), type_="metrics", data=data)
        elif kind == "step":
            outcome.steps.append(data)
            loss = data.get("loss")  # null when not finite
            shown = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
            message = f"Step {data.get('step')}/{data.get('total_steps')}: training loss={shown}"
            trained = data.get("trained_tokens")
            self.jobs.progress(job.id, self.id, event=message, data=data,
                               trained_tokens=trained if isinstance(trained, int) else None)
        elif event.get("message"):
            self.jobs.add_event(job.id, scrub(str(event["message"])), data=data or None)

    def _publish(self, job: Job, workdir: Path, outcome: _Outcome) -> None:
        """Publish the kept epochs' checkpoints and then the final adapter, all inactive, and store the metrics
        CSV; then make the final version active in the transaction that records the job's success
        (`JobStore.finish_published`). A job cancelled or lost meanwhile, or a failure on the way, withdraws
        every version and the file."""
        published, result_file = [], None
        try:
            kept = [e for e in outcome.epochs if e.get("saved")]
            entries = []
            for epoch in kept:
                version = self.registry.publish(workdir / "checkpoints" / epoch["saved"], job.tenant_id, job.suffix,
                                                origin=job.id, activate=False).version
                published.append(version)
                entries.append(results.checkpoint_entry(job.id, job.suffix, version, epoch))
            version = self.registry.publish(workdir / "adapter", job.tenant_id, job.suffix, origin=job.id,
                                            activate=False).version
            published.append(version)
            if outcome.epochs:
                entries.append(results.checkpoint_entry(job.id, job.suffix, version, outcome.epochs[-1]))
            content = results.metrics_csv(outcome.steps, outcome.epochs)
            result_file = results.save_result_file(self.settings, self.jobs, job.tenant_id, content).id
            model = f"{job.suffix}@{version}"
            ending = self.jobs.finish_published(
                job.id, self.id, version, fine_tuned_model=model, result=outcome.result, result_files=[result_file],
                checkpoints=entries, trained_tokens=outcome.result.get("trained_tokens"),
                event=f"Published adapter '{job.suffix}' version {version}; "
                f"call it as model '{model}' (or '{job.suffix}').")
        except BaseException:
            self._withdraw_all(job, published, result_file)
            raise
        if ending == "succeeded":
            log.info("job %s published %s/%s v%s", job.id, job.tenant_id, job.suffix, version)
            return
        log.warning("job %s ended %s while publishing; withdrawing versions %s", job.id, ending, published)
        self._withdraw_all(job, published, result_file)

    def _withdraw_all(self, job: Job, versions: list[int], result_file: str | None) -> None:
        """Withdraw a job's versions (newest first: the last one out takes an adapter it made with it) and its
        result file."""
        for version in reversed(versions):
            self._withdraw(job.tenant_id, job.suffix, version)
        if result_file is not None:
            try:
                self.jobs.delete_file(job.tenant_id, result_file)
            except Exception:  # gone with its tenant
                log.debug("result file %s already gone", result_file)
            file_path(self.settings, job.tenant_id, result_file).unlink(missing_ok=True)

    def _withdraw(self, tenant: str, name: str, version: int) -> None:
        """Remove a version that never became active (its job did not succeed)."""
        try:
            adapter = self.store.get_adapter(tenant, name)
            if adapter is not None and adapter.versions == (version,) and adapter.active_version is None:
                self.store.delete_adapter(tenant, name)
                self.registry.remove(tenant, name)
            elif adapter is not None and version in adapter.versions and adapter.active_version != version:
                self.store.delete_version(tenant, name, version)
                self.registry.remove(tenant, name, version)
            elif adapter is None and self.store.get_tenant(tenant) is not None:
                self.registry.remove(tenant, name, version)
        except Exception:  # the tenant or adapter went away meanwhile: nothing left to withdraw
            log.warning("could not withdraw %s/%s v%s", tenant, name, version, exc_info=True)

    def _fail(self, job: Job, code: str, message: str) -> None:
        """Fail the job if it is still this worker's; never raises (the job may be gone with its tenant)."""
        try:
            self.jobs.set_status(job.id, "failed", holder=self.id, level="error", event=message,
                                 error={"code": code, "message": message, "param": None})
        except Exception:
            log.exception("could not record the failure of job %s", job.id)


class _Outcome:
    def __init__(self):
        self.result: dict | None = None
        self.error: dict | None = None
        self.steps: list[dict] = []  # each step's figures, for the metrics CSV
        self.epochs: list[dict] = []  # each epoch's checkpoint event: figures, and the folder it was saved to


# What a training child may inherit from the worker's environment: the system's basics and the knobs of
# PyTorch, its math libraries, CUDA and Hugging Face. Nothing else: not LORASERVE_* (admin key, database URL),
# not PG* or cloud credentials.
_CHILD_ENV_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
                    "PYTHONHASHSEED", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SYSTEMROOT"}
_CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH_",
                       "PYTORCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "XDG_CACHE_HOME")


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The training child's environment, built from an allow-list, never a copy of the worker's."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k in _CHILD_ENV_NAMES or k.startswith(_CHILD_ENV_PREFIXES)}
    root = str(Path(__file__).resolve().parents[2])  # the child imports `adapters` from where this package is
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


# Absolute paths in what the child reports (an exception's message, a library's warning): a tenant never sees
# the server's file system. `Step 1/3` and `n/a` are not paths (no leading slash after a boundary).
_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"(),;:]+/)*[^\s/'\"(),;:]*")


def scrub(value):
    """`value` (text, or JSON data) with every absolute file path replaced by `<path>`."""
    if isinstance(value, str):
        return _PATH.sub("<path>", value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it
except OSError:  # not Linux: no parent-death signal; the try/finally in `_train` still holds
    _libc = None


def _die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGKILL when the worker dies (Linux), and never runs if it already has."""

    def arm() -> None:
        if _libc is None or not hasattr(_libc, "prctl"):
            return
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the worker died before the signal was armed
            os._exit(1)

    return arm


def _kill_group(child: subprocess.Popen) -> None:
    """Kill the child's process group (the child and anything it started) and reap the child. A child
    already reaped is not signalled: its group id may belong to someone else by now."""
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
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
