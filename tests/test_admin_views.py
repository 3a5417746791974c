"""The admin API the console reads: any tenant's jobs, recent traffic, what each engine holds (real gateway and
engine), and the traffic history's arithmetic on a real metrics registry."""

from __future__ import annotations

import math

from server.observability.metrics import Metrics, RequestRecorder
from server.observability.traffic import TrafficHistory, median_from_buckets
from tests.test_fine_tuning import TRAIN, WorkerProcess, new_tenant, upload, wait_for


def test_median_from_buckets_interpolates_like_prometheus():
    assert median_from_buckets({}) is None
    assert median_from_buckets({0.1: 0, 1.0: 0, math.inf: 0}) is None
    assert median_from_buckets({0.1: 0, 1.0: 4, math.inf: 4}) == 0.55  # all four in (0.1, 1]: the middle
    assert median_from_buckets({0.1: 2, 1.0: 2, math.inf: 4}) == 0.1
    assert median_from_buckets({0.1: 0, 1.0: 1, math.inf: 4}) == 1.0  # above the last bound: that bound


def _request(metrics: Metrics, tenant: str, adapter: str, status: int, tokens: tuple[int, int]) -> None:
    recorder = RequestRecorder(metrics, 0.0, tenant, "chat")
    recorder.adapter = adapter
    recorder.usage({"prompt_tokens": tokens[0], "completion_tokens": tokens[1]})
    recorder.finished(status)


def test_traffic_report_is_per_interval_and_per_series():
    metrics = Metrics()
    history = TrafficHistory(metrics, interval=10, window=30)
    history.sample(now=1000)
    _request(metrics, "acme", "support", 200, (5, 7))
    _request(metrics, "acme", "support", 429, (0, 0))
    history.sample(now=1010)
    _request(metrics, "zeta", "base", 200, (1, 1))
    report = history.report(now=1015)
    assert report["interval_seconds"] == 10 and report["window_seconds"] == 30
    acme, zeta = report["series"]
    assert (acme["tenant"], acme["adapter"], acme["requests"], acme["errors"]) == ("acme", "support", 2, 1)
    assert (acme["prompt_tokens"], acme["completion_tokens"]) == (5, 7)
    assert [(p["t"], p["requests"], p["tokens"]) for p in acme["points"]] == [(1010, 2, 12), (1015, 0, 0)]
    assert acme["ttft_p50_seconds"] is not None  # the 200's first token
    # A series that appears later still has every interval, so the charts share one time axis.
    assert (zeta["tenant"], zeta["requests"], [p["requests"] for p in zeta["points"]]) == ("zeta", 1, [0, 1])

    for now in (1020, 1030, 1040, 1050):  # the window slides past acme's requests
        history.sample(now=now)
    assert [s["tenant"] for s in history.report(now=1055)["series"]] == []


def test_admin_reads_any_tenants_jobs_as_the_tenant_does(gateway):
    key = new_tenant(gateway, "jobs-seen")
    client = gateway.client(key)
    worker = WorkerProcess(gateway)
    worker.start()
    try:
        job = client.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                             training_file=upload(client, TRAIN).id, suffix="watched",
                                             hyperparameters={"n_epochs": 1})
        done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    finally:
        worker.stop()
    base = f"/tenants/jobs-seen/fine_tuning/jobs/{job.id}"
    listed = gateway.admin("GET", "/tenants/jobs-seen/fine_tuning/jobs").json()
    assert [j["id"] for j in listed["data"]] == [job.id]
    shown = gateway.admin("GET", base).json()
    assert shown["status"] == done.status == "succeeded" and shown["fine_tuned_model"] == done.fine_tuned_model
    events = gateway.admin("GET", f"{base}/events", params={"limit": 100}).json()["data"]
    assert [e["id"] for e in events] == [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(isinstance((e["data"] or {}).get("loss"), float) for e in events)  # the curve's points

    # Another tenant's name does not reach the job; a tenant's key does not reach the admin routes.
    assert gateway.admin("GET", f"/tenants/alpha/fine_tuning/jobs/{job.id}").status_code == 404
    assert gateway.admin("GET", "/tenants/nobody-here/fine_tuning/jobs").status_code == 404
    for method, path in (("GET", base), ("POST", f"{base}/cancel"), ("GET", "/traffic"), ("GET", "/engines")):
        assert gateway.admin(method, path, headers={"Authorization": f"Bearer {key}"}).status_code == 403
    after = gateway.admin("POST", f"{base}/cancel")  # finished: stays as it ended, as for the tenant
    assert after.status_code == 200 and after.json()["status"] == "succeeded"
    audit = gateway.admin("GET", "/audit", params={"limit": 5}).json()["data"]
    assert any(a["action"] == "job.cancel" and a["object"] == f"jobs-seen/{job.id}" for a in audit)


def test_traffic_and_engines_show_this_gateways_requests(gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    for _ in range(3):
        alpha.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    series = {(s["tenant"], s["adapter"]): s for s in gateway.admin("GET", "/traffic").json()["series"]}
    support = series[("alpha", "support")]
    assert support["requests"] >= 3 and support["completion_tokens"] >= 3
    assert support["ttft_p50_seconds"] > 0 and sum(p["requests"] for p in support["points"]) == support["requests"]

    engines = gateway.admin("GET", "/engines").json()["data"]
    assert len(engines) == 1 and engines[0]["up"] is True
    held = {(a["tenant"], a["model"]) for a in engines[0]["adapters"]}
    assert any(tenant == "alpha" and model.startswith("support@") for tenant, model in held)
