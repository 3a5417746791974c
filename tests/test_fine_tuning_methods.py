"""OpenAI's fine-tuning API as documented today, end to end with the official `openai` client and a real worker:
`method`, `metadata`, checkpoints, result files, `files.content`, pause/resume, continued training."""

from __future__ import annotations

import openai
import pytest

from tests.test_fine_tuning import TRAIN, VALIDATION, ask, upload, wait_for, worker  # noqa: F401

SUPERVISED = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 2}}}
COLUMNS = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"


def refused(call, status: int, param: str | None = None) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    assert caught.value.status_code == status, caught.value.body
    if param is not None:
        assert caught.value.body["param"] == param, caught.value.body
    return caught.value


def test_method_checkpoints_result_files_and_continued_training(gateway, worker):  # noqa: F811
    alpha, beta = gateway.client(gateway.tenants["alpha"].key), gateway.client(gateway.tenants["beta"].key)
    train, validation = upload(alpha, TRAIN), upload(alpha, VALIDATION, "validation.jsonl")
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name, training_file=train.id,
                                        validation_file=validation.id, suffix="keeper", method=SUPERVISED,
                                        metadata={"team": "lighthouse"}, extra_body={"lora_rank": 4})
    assert job.method.type == "supervised" and job.metadata == {"team": "lighthouse"}
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (3, 4, 2)  # "auto" resolved
    assert job.hyperparameters.n_epochs == 3
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "keeper@3"  # epochs 1 and 2 are checkpoints @1, @2

    # Checkpoints: one per kept epoch, newest first, paged; each one servable.
    checkpoints = list(alpha.fine_tuning.jobs.checkpoints.list(job.id, limit=1))  # auto-pagination ends
    assert [c.step_number for c in checkpoints] == [3, 2, 1]
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == ["keeper@3", "keeper@2", "keeper@1"]
    first = checkpoints[0]
    assert first.object == "fine_tuning.job.checkpoint" and first.fine_tuning_job_id == job.id
    assert first.metrics.step == 3 and first.metrics.train_loss > 0 and first.metrics.valid_loss > 0
    page = alpha.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert page.has_more and page.first_id == first.id and page.last_id == checkpoints[1].id
    assert ask(alpha, "keeper@1")  # an older checkpoint answers through the engine
    refused(lambda: beta.fine_tuning.jobs.checkpoints.list(job.id), 404)

    # The metrics CSV: a tenant file, downloadable; so are uploaded files; never another tenant's.
    [result] = done.result_files
    assert alpha.files.retrieve(result).purpose == "fine-tune-results"
    lines = alpha.files.content(result).text.splitlines()
    assert lines[0] == COLUMNS and len(lines) == 4
    assert all(line.split(",")[3] for line in lines[1:])  # validation measured at every epoch's end
    assert alpha.files.content(train.id).content == TRAIN
    for file_id in (result, train.id):
        refused(lambda f=file_id: beta.files.content(f), 404)

    # The metadata filter.
    assert job.id in {j.id for j in alpha.fine_tuning.jobs.list(metadata={"team": "lighthouse"})}
    assert job.id not in {j.id for j in alpha.fine_tuning.jobs.list(metadata={"team": "other"})}

    # Continued training: from the adapter's active version, a new version of it, with its rank.
    more = alpha.fine_tuning.jobs.create(model="keeper", training_file=train.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert more.model == "keeper@3" and more.suffix == "keeper"
    again = wait_for(alpha, more.id, ("succeeded", "failed", "cancelled"))
    assert again.status == "succeeded", again.error and again.fine_tuned_model == "keeper@4"
    assert gateway.services.registry.manifest("alpha", "keeper", 4)["rank"] == 4

    def first_loss(job_id: str) -> float:
        events = alpha.fine_tuning.jobs.list_events(job_id, limit=100).data
        return next(e.data["loss"] for e in reversed(events) if e.data and e.data.get("step") == 1 and "loss" in e.data)

    assert first_loss(more.id) < first_loss(job.id)  # it starts from the trained weights, not from zero


def test_bad_requests_name_their_field(gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    train = upload(alpha, TRAIN)
    create = alpha.fine_tuning.jobs.create
    base = gateway.settings.served_model_name

    def job(**fields):
        return lambda: create(**{"model": base, "training_file": train.id, **fields})

    error = refused(job(method={"type": "reinforcement"}), 400, "method.type")
    assert "not supported" in error.message and "'dpo'" in error.message
    for beta in (0, 2.5, "high"):
        refused(job(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}}), 400)
    refused(job(method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}, hyperparameters={"n_epochs": 2}),
            400, "hyperparameters")
    refused(job(method={"type": "sideways"}), 400, "method.type")
    refused(job(method=SUPERVISED, hyperparameters={"n_epochs": 5}), 400, "hyperparameters")
    refused(job(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata")
    refused(job(metadata={"k" * 65: "v"}), 400)
    refused(job(metadata={"k": "v" * 513}), 400)
    for model in ("nope", "legal", "legal@1", "support@99"):  # unknown, beta's, beta's, no such version
        assert refused(job(model=model), 404, "model").code == "model_not_found"
    refused(job(model="support", suffix="other"), 400, "suffix")
    refused(job(model="support", extra_body={"lora_rank": 4}), 400, "lora_rank")

    same = create(model=base, training_file=train.id, suffix="same", hyperparameters={"n_epochs": 1},
                  method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert same.method.supervised.hyperparameters.n_epochs == 1  # given twice, the same: accepted
    for action in (alpha.fine_tuning.jobs.pause, alpha.fine_tuning.jobs.resume):
        assert refused(lambda a=action: a(same.id), 400).code == "unsupported_operation"
        refused(lambda a=action: gateway.client(gateway.tenants["beta"].key).fine_tuning.jobs.pause(same.id), 404)
    alpha.fine_tuning.jobs.cancel(same.id)
