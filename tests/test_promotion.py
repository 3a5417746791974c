"""Promotion policies (issue 15, item 3): a new version serves only if its evaluation on the golden set says so,
whatever made it: an upload (decided in its request), the CLI or a fine-tuning job (decided by the gateway, which
takes up versions waiting for their evaluation)."""

from __future__ import annotations

import threading
import time

import pytest

from adapters.zero import ensure_zero_adapter
from server.publishing.promotion import decide
from tests.conftest import make_peft_adapter
from tests.test_admin import new_tenant, upload_files
from tests.test_evaluation import base_answers_golden_set, httpx_call
from tests.test_fine_tuning import TRAIN, upload, worker  # noqa: F401
from tests.test_fine_tuning import wait_for as wait_for_job
from tests.test_hostile_tenant import Records, wait_for


def report(adapter: tuple[float, float], rival: tuple[float, float] | None = None,
           general: tuple[float, float] = (2.0, 2.0)) -> dict:
    """A report with the adapter's and the rival's (similarity, loss) on the golden set (the base: (0.5, 1.0))."""
    golden = {"adapter": {"similarity": adapter[0], "loss": adapter[1]}, "base": {"similarity": 0.5, "loss": 1.0}}
    if rival is not None:
        golden["replaces"] = {"similarity": rival[0], "loss": rival[1], "version": 3}
    return {"golden": golden, "general": {"adapter": {"loss": general[0]}, "base": {"loss": general[1]}}}


@pytest.mark.parametrize("policy, max_forgetting, evaluated, promote, words", [
    ("always", None, {"error": "engine away"}, True, "'always'"),
    ("if_better", None, report((0.8, 0.9), rival=(0.7, 0.6)), True, "beats version 3: similarity 0.800"),
    ("if_better", None, report((0.6, 0.5), rival=(0.7, 0.6)), False, "does not beat version 3"),  # lower loss: no
    ("if_better", None, report((0.7, 0.5), rival=(0.7, 0.6)), True, "loss 0.5000 against"),  # same answers: loss
    ("if_better", None, report((0.7, 0.6), rival=(0.7, 0.6)), False, "does not beat version 3"),
    ("if_better", None, report((0.6, 1.2)), True, "beats the base model"),  # a first version: against the base
    ("if_better", None, report((0.4, 0.9)), False, "does not beat the base model"),
    ("if_better", None, {"error": "engine away"}, False, "needs an evaluation, and it failed: engine away"),
    ("if_better_and_retains", None, report((0.8, 0.5), (0.7, 0.6), general=(2.09, 2.0)), True, "+4.5%"),
    ("if_better_and_retains", None, report((0.8, 0.5), (0.7, 0.6), general=(2.11, 2.0)), False,
     "5.5% above the base model's"),
    ("if_better_and_retains", 0.1, report((0.8, 0.5), (0.7, 0.6), general=(2.11, 2.0)), True, "at most 10.0% allowed"),
    ("if_better_and_retains", 0.1, report((0.6, 0.5), (0.7, 0.6)), False, "does not beat"),
])
def test_the_policy_decides_on_the_answers_then_the_loss_and_the_general_sets_rise(policy, max_forgetting, evaluated,
                                                                                   promote, words):
    decision = decide(policy, max_forgetting, evaluated)
    assert decision.promote is promote and words in decision.reason, decision.reason


def versions(gateway, name: str) -> dict[int, dict]:
    return {v["version"]: v for v in gateway.admin("GET", f"/tenants/gatekeeper/adapters/{name}").json()["versions"]}


def wait_decided(gateway, name: str, version: int, timeout: float = 600) -> dict:
    """The version once the gateway has decided its promotion (liveness: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = versions(gateway, name).get(version)
        if found and not found["awaiting_evaluation"] and (found["evaluation"] or {}).get("promotion"):
            return found
        assert time.monotonic() < deadline, f"version {version} not decided: {found}"
        time.sleep(1)


@pytest.fixture(scope="module")
def gatekeeper(gateway, tmp_path_factory, base_model_path):
    """Tenant `gatekeeper`, adapter `gated`: version 1 a random adapter (active), then a golden set of the base
    model's own answers and the policy `if_better`."""
    key = new_tenant(gateway, "gatekeeper")
    folder = tmp_path_factory.mktemp("gated")
    adapters = {"random": make_peft_adapter(base_model_path, folder / "random", seed=21, b_std=0.2),
                "other": make_peft_adapter(base_model_path, folder / "other", seed=22, b_std=0.2),
                "zero": ensure_zero_adapter(folder / "zero", gateway.services.registry.base)}
    assert upload_files(gateway, "gatekeeper", "gated", adapters["random"]).status_code == 201
    golden = base_answers_golden_set(gateway, gateway.client(key))
    configured = httpx_call(gateway, key, "PATCH", "/adapters/gated", json={"golden_set": golden,
                                                                           "promotion": "if_better"})
    assert configured.status_code == 200 and configured.json()["promotion"] == "if_better", configured.text
    return key, adapters


def test_an_upload_that_does_not_beat_the_active_version_stays_inactive_with_the_reason(gateway, gatekeeper):
    """The zero adapter (the base model, whose answers the set holds) beats the random version 1 and serves; another
    random adapter does not beat it: published, inactive, callable as NAME@N, with the reason in its report and the
    audit log."""
    key, adapters = gatekeeper
    better = upload_files(gateway, "gatekeeper", "gated", adapters["zero"])
    assert better.status_code == 201 and better.json()["active_version"] == 2, better.text
    assert versions(gateway, "gated")[2]["evaluation"]["promotion"]["promoted"] is True

    worse = upload_files(gateway, "gatekeeper", "gated", adapters["other"])
    assert worse.status_code == 201 and worse.json()["active_version"] == 2, worse.text
    verdict = versions(gateway, "gated")[3]["evaluation"]["promotion"]
    assert verdict["promoted"] is False and "does not beat version 2" in verdict["reason"]
    assert verdict["policy"] == "if_better"
    audit = gateway.admin("GET", "/audit").json()["data"]
    assert any(r["action"] == "adapter.promote" and r["object"] == "gatekeeper/gated@3" and r["result"] == "refused"
               for r in audit)
    client = gateway.client(key)
    assert client.chat.completions.create(model="gated@3", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content


def test_a_version_published_from_the_cli_waits_for_its_evaluation(gateway, gatekeeper):
    """`loraserve adapter publish` writes the registry and database directly, with no engine: where the adapter has
    a golden set the version is recorded waiting, and the gateway evaluates it and applies the policy."""
    key, adapters = gatekeeper
    configured = httpx_call(gateway, key, "PATCH", "/adapters/gated", json={"promotion": "always"})
    assert configured.status_code == 200
    active_before = configured.json()["active_version"]
    published = []
    thread = threading.Thread(target=lambda: published.append(
        gateway.services.registry.publish(adapters["zero"], "gatekeeper", "gated", origin="cli")))
    thread.start()
    thread.join()
    [version] = [p.version for p in published]
    decided = wait_decided(gateway, "gated", version)
    assert decided["active"] and decided["evaluation"]["promotion"] == {
        "policy": "always", "promoted": True, "reason": "promotion policy 'always'"}
    assert decided["evaluation"]["golden"]["replaces"]["version"] == active_before


def test_a_waiting_version_is_put_off_while_the_tenant_has_an_evaluation_running(gateway, gatekeeper):
    """Guards "no decision without evidence": while another evaluation of the tenant's runs (or the engine is away),
    a waiting version is put off, not refused or promoted unevaluated; it is decided once the evaluation can run."""
    _, adapters = gatekeeper
    gateway.services.evaluating.add("gatekeeper")  # as if one of its evaluations were running
    try:
        with Records("loraserve.promotion") as records:
            version = gateway.services.registry.publish(adapters["zero"], "gatekeeper", "gated", origin="cli").version
            wait_for(lambda: any(f"v{version}: evaluation postponed" in line for line in records.lines),
                     "the waiting version was never taken up")
        waiting = versions(gateway, "gated")[version]
        assert waiting["awaiting_evaluation"] and waiting["evaluation"] is None and not waiting["active"]
    finally:
        gateway.services.evaluating.discard("gatekeeper")
    assert wait_decided(gateway, "gated", version)["evaluation"]["version"] == version


def test_a_jobs_version_is_evaluated_before_it_serves_and_the_job_says_what_was_decided(gateway, gatekeeper,
                                                                                     worker):  # noqa: F811
    """A job training a new version of an adapter with a golden set succeeds with the version published and waiting;
    the gateway evaluates it, the policy decides, and the job shows the report (in `result` and as a CSV result
    file) and the decision (in its events)."""
    key, _ = gatekeeper
    assert httpx_call(gateway, key, "PATCH", "/adapters/gated", json={"promotion": "if_better"}).status_code == 200
    active_before = gateway.admin("GET", "/tenants/gatekeeper/adapters/gated").json()["active_version"]
    client = gateway.client(key)
    job = client.fine_tuning.jobs.create(model=gateway.settings.served_model_name, suffix="gated",
                                         training_file=upload(client, TRAIN).id,
                                         hyperparameters={"n_epochs": 1})
    done = wait_for_job(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    version = int(done.fine_tuned_model.split("@")[1])
    decided = wait_decided(gateway, "gated", version)
    verdict = decided["evaluation"]["promotion"]
    assert decided["active"] is verdict["promoted"]
    assert decided["evaluation"]["golden"]["few_shot"]["from"] == "training_file"  # the job's own data
    if not verdict["promoted"]:
        assert gateway.admin("GET", "/tenants/gatekeeper/adapters/gated").json()["active_version"] == active_before
    shown = client.fine_tuning.jobs.retrieve(job.id)
    assert shown.model_extra["result"]["evaluation"] == decided["evaluation"]
    steps_csv, evaluation_csv = shown.result_files
    assert client.files.content(steps_csv).text.startswith("step,")
    assert client.files.content(evaluation_csv).text.startswith("set,model,version,examples")
    assert client.files.retrieve(evaluation_csv).filename == "evaluation.csv"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)]
    assert any("evaluated on the adapter's golden set before it serves" in m for m in messages), messages
    assert any(m.startswith(f"Version {version} ") and verdict["reason"] in m for m in messages), messages
