"""Metrics as an operator sees them: a real Prometheus scrapes the gateway during known traffic, sending the
metrics token as deploy/prometheus.yml does (/metrics refuses tenants; see tests/test_ingress.py)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import httpx
import pytest
import yaml
from pydantic import SecretStr

from tests.adapter_files import write_adapter
from tests.conftest import ADMIN_KEY, REPO, free_port, wait_until_ok

PROMPT = [{"role": "user", "content": "Say something."}]


METRICS_TOKEN = "test-metrics-token-for-prometheus"


@pytest.fixture(scope="module")
def metrics_token(gateway):
    settings = gateway.services.settings
    before = settings.metrics_token
    settings.metrics_token = SecretStr(METRICS_TOKEN)
    yield METRICS_TOKEN
    settings.metrics_token = before


@pytest.fixture(scope="module")
def prometheus(gateway, metrics_token, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing; `make test` installs it"
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (folder / "metrics-token").write_text(metrics_token)
    (folder / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "gateway", "static_configs": [
            {"targets": [gateway.url.removeprefix("http://")]}],
            "authorization": {"type": "Bearer", "credentials_file": str(folder / "metrics-token")}}],
    }))
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(folder / "log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{url}/-/ready", process, folder / "log")
    yield url
    process.terminate()
    process.wait(30)


def query(prometheus: str, expr: str) -> float | None:
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def eventually(prometheus: str, expr: str, expected: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (value := query(prometheus, expr)) != expected:
        assert time.monotonic() < deadline, f"{expr} = {value}, expected {expected}"
        time.sleep(0.5)


def test_prometheus_sees_exact_counts_per_tenant_and_adapter(gateway, prometheus, tmp_path):
    keys = {}
    for tenant in ("kappa", "lambda"):
        assert gateway.admin("POST", "/tenants", json={"id": tenant}).status_code == 201
        keys[tenant] = gateway.admin("POST", f"/tenants/{tenant}/keys").json()["key"]
    folder = write_adapter(tmp_path / "helper")
    files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir()]
    assert gateway.admin("POST", "/tenants/kappa/adapters", data={"name": "helper"}, files=files).status_code == 201

    kappa, lam = gateway.client(keys["kappa"]), gateway.client(keys["lambda"])
    prompt = completion = 0
    for _ in range(2):
        usage = kappa.chat.completions.create(model="helper", messages=PROMPT, max_tokens=5).usage
        prompt, completion = prompt + usage.prompt_tokens, completion + usage.completion_tokens
    chunks = list(kappa.chat.completions.create(model="helper", messages=PROMPT, max_tokens=5, stream=True,
                                                stream_options={"include_usage": True}))
    prompt, completion = prompt + chunks[-1].usage.prompt_tokens, completion + chunks[-1].usage.completion_tokens
    base_completion = sum(lam.completions.create(model=gateway.settings.served_model_name, prompt="Hello",
                                                 max_tokens=3).usage.completion_tokens for _ in range(2))

    eventually(prometheus, 'sum(loraserve_requests_total{tenant="kappa",adapter="helper",status="200"})', 3)
    eventually(prometheus, 'sum(loraserve_requests_total{tenant="lambda",adapter="base"})', 2)
    eventually(prometheus, 'loraserve_prompt_tokens_total{tenant="kappa",adapter="helper"}', prompt)
    eventually(prometheus, 'loraserve_completion_tokens_total{tenant="kappa",adapter="helper"}', completion)
    eventually(prometheus, 'loraserve_completion_tokens_total{tenant="lambda",adapter="base"}', base_completion)
    eventually(prometheus, 'loraserve_time_to_first_token_seconds_count{tenant="kappa",adapter="helper"}', 3)
    eventually(prometheus, 'loraserve_gateway_overhead_seconds_count{tenant="lambda",adapter="base"}', 2)
    eventually(prometheus, 'loraserve_registry_versions{tenant="kappa"}', 1)
    assert query(prometheus, 'loraserve_engine_up') == 1
    assert query(prometheus, 'up{job="gateway"}') == 1  # scraped with the token, as deploy/prometheus.yml does
    assert query(prometheus, 'sum(loraserve_uploads_total{result="accepted"})') >= 1


def metrics_text(gateway) -> str:
    response = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_promtool_accepts_the_metrics_and_the_shipped_files(gateway, tmp_path):
    checked = subprocess.run(["promtool", "check", "metrics"], input=metrics_text(gateway), text=True,
                             capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # promtool checks that the token file exists: point it at one here, beside a copy of the rules.
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        if "authorization" in job:
            (tmp_path / "metrics-token").write_text("x")
            job["authorization"]["credentials_file"] = str(tmp_path / "metrics-token")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    for rule_file in config["rule_files"]:
        shutil.copy(REPO / "deploy" / rule_file, tmp_path / rule_file)
    for args in (["check", "config", str(tmp_path / "prometheus.yml")], ["check", "rules", "deploy/alerts.yml"]):
        done = subprocess.run(["promtool", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    json.loads((REPO / "deploy" / "grafana" / "dashboard.json").read_text())


def test_unknown_model_names_add_no_series(gateway):
    headers = {"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}
    body = {"messages": PROMPT, "max_tokens": 1}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as client:
        assert client.post("/v1/chat/completions", json={**body, "model": "warm-up"}).status_code == 404
        before = series(metrics_text(gateway))
        for i in range(1000):
            assert client.post("/v1/chat/completions", json={**body, "model": f"odd-{i}-\u00e9"}).status_code == 404
    after = series(metrics_text(gateway))
    assert after == before
    assert not any("odd-" in s for s in after)


def test_request_id_header_and_one_structured_log_line(gateway, caplog):
    key = gateway.tenants["alpha"].key
    with caplog.at_level(logging.INFO, logger="loraserve.access"):
        mine = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "support", "messages": PROMPT,
                          "max_tokens": 2}, headers={"Authorization": f"Bearer {key}", "X-Request-ID": "trace-42"})
        made = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert mine.headers["x-request-id"] == "trace-42" and len(made.headers["x-request-id"]) == 32
    lines = [r.fields for r in caplog.records if r.name == "loraserve.access"]
    line = next(f for f in lines if f["request_id"] == "trace-42")
    assert line["tenant"] == "alpha" and line["adapter"] == "support" and line["status"] == 200
    assert line["completion_tokens"] == mine.json()["usage"]["completion_tokens"]
    assert line["path"] == "/v1/chat/completions" and line["latency_ms"] > 0
    assert key not in json.dumps(lines) and "Say something" not in json.dumps(lines)
