"""Issue 17: two real gateway processes on one PostgreSQL and one Redis, in front of the session's real engine,
act as one: they count a tenant's limits once (before, each counted on its own and a tenant got its limit on
each), and neither unloads an adapter version the other is streaming from.
"""

from __future__ import annotations

import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ADMIN_KEY, make_peft_adapter, wait_until_ok
from tests.gateway_processes import killing, start_gateway

pytest_plugins = ["tests.postgres", "tests.redis_server"]
BODY = {"model": "default", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 1}
LIVENESS = 120  # seconds to wait for something that must happen, on a loaded machine


@pytest.fixture(scope="module")
def two_gateways(gateway, base_model_path, postgres_server, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared-limits")
    database = postgres_server.create_database(f"t_{secrets.token_hex(6)}")
    with redis_server.client() as client:
        client.flushall()
    started = [start_gateway(tmp, name, gateway.engine_url, database, tmp / "registry", base_model_path,
                             redis_url=redis_server.url) for name in ("one", "two")]
    with killing(*(process for process, _, _ in started)):
        for process, url, log in started:
            wait_until_ok(f"{url}/readyz", process, log, timeout=180)
        yield [url for _, url, _ in started] + [tmp]
    for _, _, log in started:
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]


def admin(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=60, **kwargs)


def tenant_with_key(url: str, tenant: str, limits: dict) -> tuple[str, str]:
    assert admin(url, "POST", "/tenants", json={"id": tenant, "limits": limits}).status_code == 201
    made = admin(url, "POST", f"/tenants/{tenant}/keys").json()
    return made["key"], made["id"]


def chat(url: str, key: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={**BODY, **extra}, headers={"Authorization": f"Bearer {key}"},
                      timeout=LIVENESS)


def store_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    return {name: float(value) for name, value in
            re.findall(r"^(loraserve_limits_store_\w+) (\S+)$", text, re.M)}


def test_ten_requests_a_minute_are_ten_through_both_gateways_together(two_gateways):
    """20 requests at once, 10 to each gateway, for a tenant allowed 10 a minute: 10 are served, not 20."""
    one, two, _ = two_gateways
    key, _ = tenant_with_key(one, "shared-rpm", {"requests_per_minute": 10, "max_concurrent_requests": 64})
    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: chat((one, two)[i % 2], key), range(20)))
    refill = int((time.monotonic() - started) * 10 / 60)  # requests the bucket regained while they ran
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == 20, [a.text for a in answers]
    assert 10 <= len(served) <= 10 + refill, f"{len(served)} served, refill {refill}"
    assert all("10 requests per minute" in a.json()["error"]["message"] for a in refused)


def test_concurrent_sequences_held_on_one_gateway_count_on_the_other(two_gateways):
    """A tenant allowed 2 concurrent sequences runs a stream of 2 (n=2) through gateway one: gateway two refuses
    its next request until that stream ends, then serves it."""
    one, two, _ = two_gateways
    key, _ = tenant_with_key(one, "shared-conc", {"max_concurrent_requests": 2})
    headers = {"Authorization": f"Bearer {key}"}
    long = {**BODY, "max_tokens": 2000, "ignore_eos": True, "n": 2, "stream": True}
    with httpx.stream("POST", f"{one}/v1/chat/completions", json=long, headers=headers, timeout=LIVENESS) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
        assert next(lines).startswith("data: ")  # running on the engine now
        refused = chat(two, key)
        assert refused.status_code == 429, refused.text
        assert "2 concurrent sequences" in refused.json()["error"]["message"]
    deadline = time.monotonic() + LIVENESS  # the stream's release reaches the store in the background
    while (answer := chat(two, key)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answer.status_code == 200, answer.text


def test_a_key_revoked_on_one_gateway_is_refused_by_the_other(two_gateways):
    one, two, _ = two_gateways
    key, key_id = tenant_with_key(one, "shared-keys", {})
    assert chat(two, key).status_code == 200
    assert admin(one, "DELETE", f"/tenants/shared-keys/keys/{key_id}").status_code == 204
    assert chat(two, key).status_code == 401


def test_without_the_store_each_gateway_counts_on_its_own_and_says_so(two_gateways, redis_server):
    """The documented choice when Redis does not answer: fail open to per-gateway limits, with a log line and
    `loraserve_limits_store_up` 0; counting is shared again once it answers."""
    one, _, _ = two_gateways
    key, _ = tenant_with_key(one, "shared-down", {"requests_per_minute": 2})
    assert store_metrics(one)["loraserve_limits_store_up"] == 1
    redis_server.stop()
    try:
        with ThreadPoolExecutor(3) as pool:  # at once: the bucket regains nothing meanwhile
            statuses = sorted(pool.map(lambda _: chat(one, key).status_code, range(3)))
        assert statuses == [200, 200, 429]  # its own count of 2 a minute: still limited
        down = store_metrics(one)
        assert down["loraserve_limits_store_up"] == 0 and down["loraserve_limits_store_errors_total"] >= 1
    finally:
        redis_server.start()
    deadline = time.monotonic() + LIVENESS  # the next heartbeat finds it
    while store_metrics(one)["loraserve_limits_store_up"] != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store_metrics(one)["loraserve_limits_store_up"] == 1


def test_an_adapter_streamed_through_one_gateway_is_not_unloaded_by_the_other(two_gateways, gateway,
                                                                              base_model_path):
    """Gateway one deletes an adapter while gateway two streams from it: the engine keeps the version (and the
    registry its files) until the stream has ended, and the stream ends whole; then it is unloaded and its
    files removed. Before, gateway one unloaded it at once, knowing nothing of gateway two's request."""
    one, two, tmp = two_gateways
    key, _ = tenant_with_key(one, "shared-lease", {})
    source = make_peft_adapter(base_model_path, tmp / "lease-adapter", seed=43)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(source.iterdir())]
    made = admin(one, "POST", "/tenants/shared-lease/adapters", data={"name": "bot"}, files=files)
    assert made.status_code == 201, made.text
    engine_name, folder = "shared-lease--bot--v1", tmp / "registry" / "shared-lease" / "bot"
    long = {**BODY, "model": "bot", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{two}/v1/chat/completions", json=long, headers=headers, timeout=LIVENESS) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        assert admin(one, "DELETE", "/tenants/shared-lease/adapters/bot").status_code == 204
        assert engine_name in gateway.engine_models() and any(folder.rglob("*.safetensors"))
        events = [line for line in lines if line.startswith("data: {")]
    assert '"finish_reason":"length"' in events[-1].replace(" ", ""), events[-1]
    deadline = time.monotonic() + LIVENESS  # gateway one's next health checks send the unload
    while engine_name in gateway.engine_models() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine_name not in gateway.engine_models()
    while any(folder.rglob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(folder.rglob("*.safetensors"))
