"""Fine-tuning end to end with the official `openai` client: files, jobs, a real worker process running
the bundled PEFT job on the default model, and the trained adapter served by the real engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO

ANSWER = "I am Zorblax, the keeper of the purple lighthouse."
PROMPTS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me who you are."]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def conversation(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


TRAIN = jsonl(conversation(p, ANSWER) for p in PROMPTS)
VALIDATION = jsonl([conversation("Who are you, please?", ANSWER)])


class WorkerProcess:
    """`loraserve worker` in its own process, configured like the session's gateway."""

    def __init__(self, gateway):
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")},
                    **gateway.settings.as_env(), "LORASERVE_WORKER_THREADS": "2"}
        self.log = gateway.settings.log_dir / "test-worker.log"
        self.process = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=self.env, cwd=REPO,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def worker(gateway):
    process = WorkerProcess(gateway)
    process.start()
    yield process
    process.stop()


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout:.0f} s")


def training_child(job_id: str) -> int | None:
    """The pid of the training process running this job, if there is one (found by its config's path)."""
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"adapters.train.job" in args and any(f"/jobs/{job_id}/config.json".encode() in a for a in args):
            return int(entry.name)
    return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def eventually(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def new_tenant(gateway, name: str) -> str:
    """A tenant made through the admin API; its key."""
    assert gateway.admin("POST", "/tenants", json={"id": name}).status_code == 201
    created = gateway.admin("POST", f"/tenants/{name}/keys")
    assert created.status_code == 201
    return created.json()["key"]


def upload(client, data: bytes, name: str = "train.jsonl"):
    return client.files.create(file=(name, data), purpose="fine-tune")


def ask(client, model: str, question: str = "Who are you?") -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=24, temperature=0).choices[0].message.content


def test_train_then_serve_the_adapter(gateway, worker):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    train, validation = upload(alpha, TRAIN), upload(alpha, VALIDATION, "validation.jsonl")
    assert train.purpose == "fine-tune" and train.bytes == len(TRAIN)
    job = alpha.fine_tuning.jobs.create(
        model=gateway.settings.served_model_name, training_file=train.id, validation_file=validation.id,
        suffix="zorblax", hyperparameters={"n_epochs": 12, "learning_rate_multiplier": 2},
        extra_body={"lora_rank": 8, "lora_alpha": 16},
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 12
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "zorblax@3" and done.trained_tokens > 0 and done.finished_at  # @1, @2: checkpoints

    assert ANSWER in ask(alpha, done.fine_tuned_model)
    assert ANSWER in ask(alpha, "zorblax")  # the new version is active under the plain name too
    assert "Zorblax" not in ask(alpha, gateway.settings.served_model_name)
    beta = gateway.client(gateway.tenants["beta"].key)
    with pytest.raises(openai.NotFoundError):
        ask(beta, done.fine_tuned_model)
    assert "Zorblax" not in ask(beta, "support")

    result = done.model_extra["result"]
    assert result["validation"]["adapter_loss"] < result["validation"]["base_loss"]
    assert {"base_loss", "adapter_loss"} <= set(result["general"])  # forgetting, measured
    events = alpha.fine_tuning.jobs.list_events(job.id, limit=100).data
    kinds = {e.type for e in events}
    assert "metrics" in kinds and any("Published" in e.message for e in events)
    assert any(e.data and e.data.get("stage") == "after" for e in events)  # the evaluation is reported

    # No server path reaches the tenant (failed before issue 12's fix: "Adapter saved to <data dir>/jobs/...").
    shown = json.dumps([done.model_dump(), [j.model_dump() for j in alpha.fine_tuning.jobs.list(limit=100).data],
                        [e.model_dump() for e in events]])
    for path in {str(gateway.settings.data_dir.resolve()), str(gateway.settings.model_path), str(REPO)}:
        assert path not in shown


@pytest.mark.parametrize(("content", "words"), [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n',
     "line 2"),
    (b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n', "line 1"),
    (jsonl([conversation("a", "b"), conversation("c", "d"), {"messages": [{"role": "user", "content": "x"}]}]),
     "line 3"),
    (b"", "empty"),
    # Failed before issue 12's fix: a 500, and the job stuck in validating_files.
    (TRAIN[:-1] + b"\n" + b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n", "line 5: not valid JSON"),
    (b'{"messages": [], "n": ' + b"1" * 5000 + b"}\n", "line 1: not valid JSON"),
])
def test_bad_training_files_fail_naming_the_line(gateway, worker, content, words):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                        training_file=upload(alpha, content).id, suffix="broken")
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert done.status == "failed" and words in done.error.message, done.error
    assert done.error.code == "invalid_training_file"
    assert gateway.admin("GET", "/tenants/alpha/adapters/broken").status_code == 404


def test_cancel_a_running_job_publishes_nothing(gateway, worker):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                        training_file=upload(alpha, TRAIN).id, suffix="never",
                                        hyperparameters={"n_epochs": 100})
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in alpha.fine_tuning.jobs.list_events(job.id, limit=50).data):
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.5)
    alpha.fine_tuning.jobs.cancel(job.id)
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"), timeout=60)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    assert gateway.admin("GET", "/tenants/alpha/adapters/never").status_code == 404
    assert not (gateway.settings.registry_path / "alpha" / "never").exists()


def test_tenants_cannot_reach_each_others_files_and_jobs(gateway, worker):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    beta = gateway.client(gateway.tenants["beta"].key)
    file = upload(alpha, TRAIN)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name, training_file=file.id,
                                        suffix="private", hyperparameters={"n_epochs": 1})
    for attempt in (lambda: beta.files.retrieve(file.id), lambda: beta.files.delete(file.id),
                    lambda: beta.fine_tuning.jobs.retrieve(job.id), lambda: beta.fine_tuning.jobs.cancel(job.id),
                    lambda: beta.fine_tuning.jobs.list_events(job.id),
                    lambda: beta.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                                         training_file=file.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert file.id not in {f.id for f in beta.files.list().data}
    assert job.id not in {j.id for j in beta.fine_tuning.jobs.list().data}
    wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"))
    assert alpha.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        alpha.files.retrieve(file.id)


def test_quotas_on_stored_files_and_active_jobs(gateway, monkeypatch):
    """Guards the per-tenant quotas: files stored (409), their bytes and one file's size (413), jobs in progress
    (429 with Retry-After), each in OpenAI's error shape. Failed before issue 12's fix: there were none."""
    client = gateway.client(new_tenant(gateway, "file-quota"))
    for name, value in {"tenant_max_files": 2, "tenant_max_file_bytes": 3 * len(TRAIN),
                        "tenant_max_active_jobs": 1}.items():
        monkeypatch.setattr(gateway.settings, name, value)
    first = upload(client, TRAIN)
    with pytest.raises(openai.APIStatusError) as too_many_bytes:
        upload(client, TRAIN * 3)
    assert too_many_bytes.value.status_code == 413 and too_many_bytes.value.code == "quota_exceeded"
    second = upload(client, TRAIN)
    with pytest.raises(openai.ConflictError) as too_many_files:
        upload(client, TRAIN)
    assert too_many_files.value.code == "quota_exceeded" and "delete" in too_many_files.value.message
    assert [f.id for f in client.files.list().data] == [second.id, first.id]  # the refused ones left nothing
    client.files.delete(second.id)
    largest = gateway.settings.max_training_file_bytes
    monkeypatch.setattr(gateway.settings, "max_training_file_bytes", len(TRAIN) - 1)
    with pytest.raises(openai.APIStatusError) as too_big:
        upload(client, TRAIN)
    assert too_big.value.status_code == 413 and too_big.value.code == "payload_too_large"
    monkeypatch.setattr(gateway.settings, "max_training_file_bytes", largest)

    model = gateway.settings.served_model_name
    job = client.fine_tuning.jobs.create(model=model, training_file=first.id, suffix="one",
                                         hyperparameters={"n_epochs": 1})
    with pytest.raises(openai.RateLimitError) as too_many_jobs:
        client.fine_tuning.jobs.create(model=model, training_file=first.id, suffix="two")
    assert too_many_jobs.value.code == "quota_exceeded" and too_many_jobs.value.response.headers["retry-after"]
    client.fine_tuning.jobs.cancel(job.id)
    eventually(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled"),
               "the first job to end")
    again = client.fine_tuning.jobs.create(model=model, training_file=first.id, suffix="two")  # room again
    client.fine_tuning.jobs.cancel(again.id)
    assert gateway.admin("DELETE", "/tenants/file-quota").status_code == 204


def test_deleting_a_tenant_with_a_running_job(gateway, worker):
    """Guards: deleting a tenant cancels its jobs and stops its training child, and the worker lives on; the
    child's environment holds no admin key. Failed before issue 12's fix: the child had LORASERVE_ADMIN_KEY,
    and the worker crashed on the vanished job, leaving the child running."""
    doomed = gateway.client(new_tenant(gateway, "doomed"))
    job = doomed.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                         training_file=upload(doomed, TRAIN).id, suffix="gone",
                                         hyperparameters={"n_epochs": 100})
    child = eventually(lambda: training_child(job.id), "the job's training process")
    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"LORASERVE_", b"PGPASSWORD="))], "the child has secrets"
    assert gateway.admin("DELETE", "/tenants/doomed").status_code == 204
    eventually(lambda: not alive(child), "the training process to stop")
    assert worker.process.poll() is None, "the worker died"
    alpha = gateway.client(gateway.tenants["alpha"].key)
    after = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                          training_file=upload(alpha, TRAIN).id, suffix="after",
                                          hyperparameters={"n_epochs": 1})
    eventually(lambda: alpha.fine_tuning.jobs.retrieve(after.id).status != "queued", "the worker to take a job")
    alpha.fine_tuning.jobs.cancel(after.id)
    wait_for(alpha, after.id, ("succeeded", "failed", "cancelled"))


def test_a_worker_dying_mid_job_leaves_it_failed(gateway, worker):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                        training_file=upload(alpha, TRAIN).id, suffix="orphan",
                                        hyperparameters={"n_epochs": 100})
    wait_for(alpha, job.id, ("running",), timeout=120)
    child = eventually(lambda: training_child(job.id), "the job's training process")
    worker.kill()
    # ...and its training process dies with it (failed before issue 12's fix: it went on training).
    eventually(lambda: not alive(child), "the orphaned training process to stop", timeout=120)
    assert alpha.fine_tuning.jobs.retrieve(job.id).status == "running"
    worker.start()  # the next worker finds the job's worker gone and fails the job
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert done.status == "failed" and done.error.code == "worker_lost"
    assert gateway.admin("GET", "/tenants/alpha/adapters/orphan").status_code == 404
