"""Issue 17: canary versions. A candidate version takes a share of an adapter's requests, sticky per `user` (or
X-Request-ID); `NAME@N` stays exact; counts per version are in the metrics; the candidate is rolled back by itself
when it fails more than the active version, and not started when its golden-set score is below it; every change
is audited. On the session's real gateway and engine, with the adapters of conftest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.publishing.canary import Tally, judge_errors, judge_scores
from server.serving.canary_split import split_bucket
from server.storage.adapter_records import AdapterView, VersionView
from server.storage.db import utcnow
from tests.test_evaluation import BRIEF, QUESTIONS, chat, jsonl

CANARY = {"version": 2, "weight": 10, "max_error_rate_increase": 0.05, "min_requests": 20, "max_score_drop": 0.05,
          "started": "2026-12-07T00:00:00"}


def view(canary: dict | None = None, reports: dict | None = None, tenant: str = "t") -> AdapterView:
    versions = tuple(VersionView(v, 8, 1, "test", utcnow(), evaluation=(reports or {}).get(v)) for v in (1, 2))
    return AdapterView(tenant, "bot", 1, (1, 2), utcnow(), versions, canary=canary)


def golden(similarity: float, replaces: tuple[int, float] | None = None) -> dict:
    report = {"golden": {"adapter": {"similarity": similarity, "loss": 1.0}}}
    if replaces:
        report["golden"]["replaces"] = {"version": replaces[0], "similarity": replaces[1], "loss": 1.0}
    return report


def test_the_split_is_sticky_and_near_its_weight():
    adapter = view(CANARY)
    users = [f"user-{i}" for i in range(2000)]
    share = sum(split_bucket(adapter, u) < 10 for u in users) / len(users)
    assert 0.08 <= share <= 0.12
    assert {split_bucket(adapter, "alice") for _ in range(20)} == {split_bucket(adapter, "alice")}
    # Another tenant's adapter of the same name splits the same user independently.
    other = view(CANARY, tenant="u")
    assert [split_bucket(adapter, u) for u in users[:50]] != [split_bucket(other, u) for u in users[:50]]


def test_the_error_rule_waits_for_min_requests_then_compares_with_the_active_version():
    failing = {2: Tally(19, 19), 1: Tally(100, 0)}
    assert judge_errors(CANARY, 1, failing) is None  # 19 of its 20 requests: not judged yet
    failing[2] = Tally(20, 2)
    assert "10.0% over 20 requests" in judge_errors(CANARY, 1, failing)
    assert judge_errors(CANARY, 1, {2: Tally(20, 2), 1: Tally(100, 6)}) is None  # 4 points above: within 5


def test_the_score_rule_prefers_the_report_made_against_the_active_version():
    assert judge_scores(view(), CANARY) is None  # no evaluations: nothing to say
    assert "0.700" in judge_scores(view(reports={2: golden(0.7, (1, 0.9))}), CANARY)
    assert judge_scores(view(reports={2: golden(0.87, (1, 0.9))}), CANARY) is None
    # A report against another version: the active version's own report is the yardstick.
    assert "0.900" in judge_scores(view(reports={2: golden(0.7, (3, 0.5)), 1: golden(0.9)}), CANARY)


@pytest.fixture
def two_versions(gateway):
    """A tenant whose adapter `bot` has version 1 active and version 2 published with `activate=false` (two of
    conftest's adapters)."""
    tenants = []

    def make(tenant: str) -> str:
        assert gateway.admin("POST", "/tenants", json={"id": tenant}).status_code == 201
        tenants.append(tenant)
        for activate, source in (("true", gateway.adapter_sources["alpha", "support"]),
                                 ("false", gateway.adapter_sources["beta", "legal"])):
            files = [("files", (p.name, p.read_bytes())) for p in sorted(source.iterdir())]
            made = gateway.admin("POST", f"/tenants/{tenant}/adapters", data={"name": "bot", "activate": activate},
                                 files=files)
            assert made.status_code == 201, made.text
        assert made.json()["active_version"] == 1  # version 2 published only
        return gateway.admin("POST", f"/tenants/{tenant}/keys").json()["key"]

    yield make
    for tenant in tenants:
        gateway.admin("DELETE", f"/tenants/{tenant}")


def served(gateway, tenant: str) -> dict[tuple[str, str], float]:
    """Answers per (version, result) of the tenant's `bot`, from the gateway's metrics."""
    counts = {}
    for family in gateway.services.metrics.registry.collect():
        for s in family.samples:
            if s.name == "loraserve_version_requests_total" and s.labels["tenant"] == tenant:
                counts[s.labels["version"], s.labels["result"]] = s.value
    return counts


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def ask(gateway, key: str, model: str = "bot", headers: dict | None = None, **extra) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **extra}
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})}).status_code


def test_a_canary_takes_its_share_sticky_per_user_and_leaves_name_at_n_exact(gateway, two_versions):
    key = two_versions("canary-split")
    started = gateway.admin("PUT", "/tenants/canary-split/adapters/bot/canary", json={"version": 2, "weight": 25})
    assert started.status_code == 200, started.text
    assert started.json()["canary"]["version"] == 2 and started.json()["active_version"] == 1
    adapter = gateway.services.store.require_adapter("canary-split", "bot")
    users = [f"user-{i}" for i in range(200)]
    expected = sum(split_bucket(adapter, u) < 25 for u in users)
    assert 30 <= expected <= 70  # 25% of 200, give or take

    before = served(gateway, "canary-split")
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda u: ask(gateway, key, user=u), users)) == {200}
    assert delta(before, served(gateway, "canary-split")) == {("2", "ok"): expected, ("1", "ok"): 200 - expected}

    for sticky in ({"user": "alice"}, {"headers": {"X-Request-ID": "request-7"}}):
        before = served(gateway, "canary-split")
        assert [ask(gateway, key, **sticky) for _ in range(8)] == [200] * 8
        assert list(delta(before, served(gateway, "canary-split")).values()) == [8], "one version for all 8"

    before = served(gateway, "canary-split")
    assert [ask(gateway, key, f"bot@{v}", user=u) for v in (1, 2) for u in users[:5]] == [200] * 10
    assert delta(before, served(gateway, "canary-split")) == {("1", "ok"): 5, ("2", "ok"): 5}

    # Promoting the candidate (activating it) ends the canary; every change is in the audit log.
    assert gateway.admin("POST", "/tenants/canary-split/adapters/bot/activate", json={"version": 2}).json()[
        "canary"] is None
    audit = gateway.admin("GET", "/audit", params={"limit": 20}).json()["data"]
    start = next(r for r in audit if r["action"] == "adapter.canary.start" and r["object"] == "canary-split/bot@2")
    assert start["result"] == "ok" and start["detail"] == "weight 25%"


def test_a_canary_is_refused_when_it_cannot_be_one(gateway, two_versions):
    two_versions("canary-refused")
    url = "/tenants/canary-refused/adapters/bot/canary"
    active = gateway.admin("PUT", url, json={"version": 1, "weight": 10})
    assert active.status_code == 409 and "active version" in active.json()["error"]["message"]
    assert gateway.admin("PUT", url, json={"version": 9, "weight": 10}).status_code == 404
    assert gateway.admin("PUT", url, json={"version": 2, "weight": 100}).status_code == 400
    assert gateway.admin("PUT", "/tenants/canary-refused/adapters/nope/canary",
                         json={"version": 2, "weight": 10}).status_code == 404
    # Evaluated on a golden set, version 2 answers worse than version 1: not started.
    store = gateway.services.store
    store.save_evaluation("canary-refused", "bot", 2, golden(0.5, (1, 0.8)))
    worse = gateway.admin("PUT", url, json={"version": 2, "weight": 10})
    assert worse.status_code == 409 and worse.json()["error"]["code"] == "canary_below_stable"
    assert "similarity 0.500" in worse.json()["error"]["message"]
    assert gateway.admin("PUT", url, json={"version": 2, "weight": 10, "max_score_drop": 0.5}).status_code == 200
    assert gateway.admin("DELETE", url).status_code == 204
    assert gateway.admin("GET", "/tenants/canary-refused/adapters/bot").json()["canary"] is None
    # A new version made active by its upload ends a canary: the version it was compared with is gone.
    assert gateway.admin("PUT", url, json={"version": 2, "weight": 10, "max_score_drop": 0.5}).status_code == 200
    source = gateway.adapter_sources["beta", "support"]
    files = [("files", (p.name, p.read_bytes())) for p in sorted(source.iterdir())]
    third = gateway.admin("POST", "/tenants/canary-refused/adapters", data={"name": "bot"}, files=files).json()
    assert third["active_version"] == 3 and third["canary"] is None


def test_a_candidate_that_fails_is_rolled_back_by_itself(gateway, two_versions):
    """The injected failure: the candidate's weights are damaged on disk and it is unloaded from the engine, so
    every request the split sends it fails (503) while version 1 answers. After `min_requests` of them the
    canary ends, the audit log says why, and `bot` is version 1 for every request."""
    key = two_versions("canary-fail")
    assert gateway.admin("PUT", "/tenants/canary-fail/adapters/bot/canary", json={
        "version": 2, "weight": 50, "min_requests": 3, "max_error_rate_increase": 0.2}).status_code == 200
    folder = gateway.services.registry.version_path("canary-fail", "bot", 2)
    for weights in folder.glob("*.safetensors"):
        weights.chmod(0o644)
        weights.write_bytes(b"\0" * 64)
    unloaded = httpx.post(f"{gateway.engine_url}/v1/unload_lora_adapter", json={"lora_name": "canary-fail--bot--v2"},
                          timeout=60)
    assert unloaded.status_code == 200, unloaded.text

    statuses = []
    for i in range(60):  # bounded: 3 failures of the candidate come long before
        statuses.append(ask(gateway, key, user=f"user-{i}"))
        if gateway.admin("GET", "/tenants/canary-fail/adapters/bot").json()["canary"] is None:
            break
    assert statuses.count(503) >= 3 and set(statuses) == {200, 503}
    audit = gateway.admin("GET", "/audit", params={"limit": 50}).json()["data"]
    rollback = next(r for r in audit if r["action"] == "adapter.canary.rollback")
    assert rollback["object"] == "canary-fail/bot@2" and rollback["actor"] == "gateway"
    assert "error rate" in rollback["detail"] and "above version 1's 0.0%" in rollback["detail"]
    before = served(gateway, "canary-fail")
    assert [ask(gateway, key, user=f"user-{i}") for i in range(10)] == [200] * 10
    assert delta(before, served(gateway, "canary-fail")) == {("1", "ok"): 10}
    assert served(gateway, "canary-fail")["2", "error"] >= 3


def test_a_running_canary_whose_new_evaluation_is_worse_is_rolled_back(gateway, two_versions):
    """The golden-set rule on a running canary: a golden set of version 1's own answers, then an evaluation of
    version 2 (through the admin route) that answers it worse; the canary ends, audited with the scores."""
    key = two_versions("canary-score")
    client = gateway.client(key)
    references = []
    for question in QUESTIONS:
        reply = client.chat.completions.create(model="bot@1", temperature=0, max_tokens=200,
                                               messages=chat(question, None, BRIEF)["messages"]).choices[0]
        assert reply.finish_reason == "stop", (question, reply.message.content)  # a whole answer
        references.append(chat(question, reply.message.content, BRIEF))
    golden_set = client.files.create(file=("golden.jsonl", jsonl(references)), purpose="evals").id
    assert gateway.admin("PATCH", "/tenants/canary-score/adapters/bot",
                         json={"golden_set": golden_set}).status_code == 200
    url = "/tenants/canary-score/adapters/bot"
    assert gateway.admin("PUT", f"{url}/canary", json={"version": 2, "weight": 10, "max_score_drop": 0}).status_code \
        == 200  # no evaluation yet: nothing rules it out
    report = gateway.admin("POST", f"{url}/versions/2/evaluate")
    assert report.status_code == 200, report.text
    golden = report.json()["golden"]
    assert golden["replaces"]["version"] == 1 and golden["adapter"]["similarity"] < golden["replaces"]["similarity"]
    assert gateway.admin("GET", url).json()["canary"] is None
    audit = gateway.admin("GET", "/audit", params={"limit": 20}).json()["data"]
    rollback = next(r for r in audit if r["action"] == "adapter.canary.rollback")
    assert rollback["object"] == "canary-score/bot@2" and "golden-set similarity" in rollback["detail"]
