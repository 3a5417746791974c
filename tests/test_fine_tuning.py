"""Fine-tuning end to end with the official `openai` client: files, jobs, a real worker process running
the bundled PEFT job on the default model, and the trained adapter served by the real engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    assert done.fine_tuned_model == "zorblax@1" and done.trained_tokens > 0 and done.finished_at

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


@pytest.mark.parametrize(("content", "words"), [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n',
     "line 2"),
    (b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n', "line 1"),
    (jsonl([conversation("a", "b"), conversation("c", "d"), {"messages": [{"role": "user", "content": "x"}]}]),
     "line 3"),
    (b"", "empty"),
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


def test_a_worker_dying_mid_job_leaves_it_failed(gateway, worker):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                        training_file=upload(alpha, TRAIN).id, suffix="orphan",
                                        hyperparameters={"n_epochs": 100})
    wait_for(alpha, job.id, ("running",), timeout=120)
    worker.kill()
    assert alpha.fine_tuning.jobs.retrieve(job.id).status == "running"
    worker.start()  # the next worker finds the job's worker gone and fails the job
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert done.status == "failed" and done.error.code == "worker_lost"
    assert gateway.admin("GET", "/tenants/alpha/adapters/orphan").status_code == 404
