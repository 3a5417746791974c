"""The gateway's front door, against the real gateway and engine: who may read /metrics, authentication
before any body byte is read, an unexpected error as one 500 on a connection that stays usable, and what
the engine child inherits (issue 12: item 4, item 5's unauthenticated bodies, two Low items)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from urllib.parse import urlparse

import httpx
import pytest
from pydantic import SecretStr

from server.config import Settings
from server.engine.supervisor import engine_env
from server.engine.vllm_fix import GROUPED_OPS_ENV
from tests.conftest import ADMIN_KEY

METRICS_TOKEN = "test-metrics-token-not-secret"
BIG = 30 << 20  # a declared body under the upload limit (32 MB in the suite): only authentication refuses it


@pytest.fixture
def metrics_token(gateway, monkeypatch) -> str:
    monkeypatch.setattr(gateway.services.settings, "metrics_token", SecretStr(METRICS_TOKEN))
    return METRICS_TOKEN


def scrape(gateway, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.get(f"{gateway.url}/metrics", headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"] and set(error) == {"message", "type", "param", "code"}


# Item 4: /metrics

def test_tenants_cannot_read_metrics_only_the_token_or_an_admin_key_can(gateway, metrics_token):
    """/metrics names every tenant with its usage. Failed before the fix: anyone, a tenant's key or no key
    at all, got it with 200."""
    alpha = gateway.tenants["alpha"].key
    assert_error(scrape(gateway, None), 401, "authentication_error")
    assert_error(scrape(gateway, "not-a-key"), 401, "authentication_error")
    refused = scrape(gateway, alpha)
    assert_error(refused, 403, "permission_error")
    assert "beta" not in refused.text and "loraserve_" not in refused.text
    for key in (ADMIN_KEY, metrics_token):
        ok = scrape(gateway, key)
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
        assert "loraserve_engine_up" in ok.text
    # The metrics token is no admin key and no tenant key: it opens nothing else.
    headers = {"Authorization": f"Bearer {metrics_token}"}
    assert httpx.get(f"{gateway.url}/admin/tenants", headers=headers, timeout=60).status_code == 401
    assert httpx.get(f"{gateway.url}/v1/models", headers=headers, timeout=60).status_code == 401


def test_a_scrape_does_not_health_check_the_engines(gateway, monkeypatch):
    """Each scrape used to health-check every engine (a fan-out anyone could trigger). Now only the pool's
    background `watch` checks them; /metrics reports what it last saw. Failed before the fix: the scrape's
    own request task called `pool.healthy()`."""
    pool = gateway.services.pool
    callers: list[str] = []
    original = pool.healthy

    async def spy() -> bool:
        callers.append(asyncio.current_task().get_coro().__qualname__)
        return await original()

    monkeypatch.setattr(pool, "healthy", spy)
    for key in (ADMIN_KEY, None, gateway.tenants["alpha"].key, ADMIN_KEY):
        scrape(gateway, key)
    text = scrape(gateway, ADMIN_KEY).text
    assert set(callers) <= {"EnginePool.watch"}, callers
    assert f'loraserve_engine_up{{engine="{gateway.engine_url}"}} 1.0' in text


# Item 5: no body is read before the key is checked

def raw_request(gateway, path: str, headers: dict[str, str], *, declared: int | None, first: int = 64 << 10):
    """Send a request head that announces a huge multipart body (`declared` bytes, or chunked when None),
    then only its first `first` bytes, and read the answer. The server cannot have read more than we sent;
    if it waited for the rest, no answer would come and the read would time out."""
    url = urlparse(gateway.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=120)
    boundary = "b0undary"
    head = {"Host": url.netloc, "Content-Type": f"multipart/form-data; boundary={boundary}", **headers}
    if declared is None:
        head["Transfer-Encoding"] = "chunked"
    else:
        head["Content-Length"] = str(declared)
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = part + b"x" * (first - len(part))
    if declared is None:
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n"
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode() + body)
    answer = b""
    with sock:
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
        head_bytes, rest = answer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        response_headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        while len(rest) < int(response_headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            rest += chunk
        closed = sock.recv(65536) == b""  # the server hangs up instead of reading the unread body
    return int(status_line.split()[1]), response_headers, json.loads(rest), closed


@pytest.mark.parametrize("path", ["/admin/tenants/alpha/adapters", "/v1/files"])
@pytest.mark.parametrize("declared", [BIG, None], ids=["content-length", "chunked"])
@pytest.mark.parametrize("key", [None, "ls-0123456789ab-wrong"], ids=["no-key", "wrong-key"])
def test_unauthenticated_uploads_are_refused_before_the_body_is_read(gateway, path, declared, key):
    """Failed before the fix: the gateway read (and parsed) the whole body before the route's auth ran,
    so with a 30 MB body announced and 64 KB sent, no answer came at all."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, headers, body, closed = raw_request(gateway, path, headers, declared=declared)
    assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert headers["connection"] == "close" and closed


def test_a_tenant_key_on_admin_is_refused_before_the_body_is_read(gateway):
    """The admin upload with a tenant's key: 403 at once. Failed before the fix (no answer, as above)."""
    alpha = {"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}
    status, _, body, closed = raw_request(gateway, "/admin/tenants/alpha/adapters", alpha, declared=BIG)
    assert status == 403 and body["error"]["type"] == "permission_error" and closed
    status, _, body, _ = raw_request(gateway, "/v1/files", {"Authorization": f"Bearer {ADMIN_KEY}"}, declared=BIG)
    assert status == 403 and body["error"]["type"] == "permission_error"


def test_authenticated_requests_still_pass_the_gate(gateway):
    """The gate only refuses; a valid key's request reaches its route (which authenticates it again)."""
    key = gateway.tenants["alpha"].key
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        stored = client.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("t.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
                                                        b'{"role": "assistant", "content": "hello"}]}\n')})
        assert stored.status_code == 200, stored.text
        assert client.delete(f"/v1/files/{stored.json()['id']}").status_code == 200


# Low: an unexpected error is one 500, and the connection stays usable

def test_an_unexpected_error_is_one_500_and_the_connection_stays_usable(gateway, monkeypatch, caplog):
    """Failed before the fix: Starlette re-raised after its 500, uvicorn logged "Exception in ASGI
    application" too and closed the keep-alive connection, so the next request needed a new one (the
    official SDK saw a connection reset)."""
    store = gateway.services.store
    original = store.list_adapters
    calls = 0

    def fails_once(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom: an unexpected bug in /srv/secret/path")
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "list_adapters", fails_once)
    uvicorn_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = uvicorn_records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    key = gateway.tenants["alpha"].key
    try:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with caplog.at_level(logging.ERROR, logger="loraserve.app"), httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits
        ) as client:
            failed = client.get("/v1/models")
            first_port = failed.extensions["network_stream"].get_extra_info("client_addr")[1]
            answered = client.get("/v1/models")
            second_port = answered.extensions["network_stream"].get_extra_info("client_addr")[1]
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert_error(failed, 500, "server_error")
    assert "boom" not in failed.text and "/srv" not in failed.text and "Traceback" not in failed.text
    assert answered.status_code == 200 and answered.json()["object"] == "list"
    assert first_port == second_port, "the 500 closed the keep-alive connection"
    logged = [r for r in caplog.records if r.name == "loraserve.app" and r.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info, [r.getMessage() for r in logged]
    assert not [r for r in uvicorn_records if "Exception in ASGI application" in r.getMessage()]


# Low: the engine child inherits only what it needs

def test_engine_env_drops_the_gateways_secrets_and_settings(monkeypatch):
    """Failed before the fix: `engine_env` copied all of os.environ, the admin key and database URL too."""
    monkeypatch.setenv("LORASERVE_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("LORASERVE_DATABASE_URL", "postgresql://u:pw@db/x")
    monkeypatch.setenv("LORASERVE_METRICS_TOKEN", "metrics-secret")
    for name, value in {"HF_TOKEN": "hf-secret", "AWS_SECRET_ACCESS_KEY": "aws", "VLLM_API_KEY": "engine-key",
                        "DATABASE_URL": "postgresql://u:pw@db/x", "OMP_NUM_THREADS": "2",
                        "VLLM_CPU_KVCACHE_SPACE": "4", "LC_ALL": "C.UTF-8"}.items():
        monkeypatch.setenv(name, value)
    env = engine_env(Settings(_env_file=None))
    assert [n for n in env if n.startswith("LORASERVE_")] == [GROUPED_OPS_ENV] and env[GROUPED_OPS_ENV] == "true"
    assert not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "VLLM_API_KEY", "DATABASE_URL"} & env.keys()
    assert not {"admin-secret", "metrics-secret", "hf-secret"} & set(env.values())
    assert env["PATH"] == os.environ["PATH"] and env["OMP_NUM_THREADS"] == "2" and env["LC_ALL"] == "C.UTF-8"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_the_running_engine_inherited_nothing_else(gateway):
    """The session's engine, started by the gateway while pytest ran (PYTEST_CURRENT_TEST, the shell's
    variables...): its environment holds allowed names only. Failed before the fix (it held them all)."""
    from server.engine.supervisor import engine_env_allows

    pid = gateway.services.supervisor.pid
    raw = open(f"/proc/{pid}/environ", "rb").read()  # noqa: SIM115
    env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    names = {name.decode() for name in env}
    assert [n for n in names if n.startswith("LORASERVE_")] == [GROUPED_OPS_ENV]  # the vLLM plugin's one setting
    assert "PYTEST_CURRENT_TEST" not in names and ADMIN_KEY.encode() not in raw
    assert {n for n in names if not engine_env_allows(n)} <= {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", GROUPED_OPS_ENV}
    assert env[b"VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == b"True"
