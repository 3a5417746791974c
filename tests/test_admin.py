"""Admin API on the real engine: tenants and keys, uploads with hot swap and rollback, deletes, audit."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import make_peft_adapter

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def tar_gz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"adapter/{path.name}")
    return buffer.getvalue()


def upload_files(gateway, tenant: str, name: str, folder: Path):
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    return gateway.admin("POST", f"/tenants/{tenant}/adapters", data={"name": name}, files=files)


def upload_archive(gateway, tenant: str, name: str, blob: bytes, filename: str = "adapter.tar.gz"):
    return gateway.admin("POST", f"/tenants/{tenant}/adapters", data={"name": name},
                         files={"archive": (filename, blob)})


def new_tenant(gateway, tenant: str) -> str:
    assert gateway.admin("POST", "/tenants", json={"id": tenant}).status_code == 201
    made = gateway.admin("POST", f"/tenants/{tenant}/keys")
    assert made.status_code == 201
    return made.json()["key"]


def answer(client, model: str, max_tokens: int = 16) -> str:
    return client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].message.content


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory, base_model_path):
    folder = tmp_path_factory.mktemp("uploads")
    return [make_peft_adapter(base_model_path, folder / f"v{i}", seed=10 + i) for i in (1, 2)]


def test_admin_routes_need_the_admin_key(gateway):
    tenant_key = gateway.tenants["alpha"].key
    for method, path in [("GET", "/tenants"), ("POST", "/tenants"), ("GET", "/audit"),
                         ("DELETE", "/tenants/alpha"), ("GET", "/tenants/alpha/adapters")]:
        assert gateway.admin(method, path, headers={"Authorization": "Bearer nope"}).status_code == 401
        refused = gateway.admin(method, path, headers={"Authorization": f"Bearer {tenant_key}"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert gateway.admin("GET", "/tenants/alpha").status_code == 200  # alpha still exists


def test_tenants_and_keys(gateway):
    key = new_tenant(gateway, "gamma")
    assert gateway.admin("POST", "/tenants", json={"id": "gamma"}).status_code == 409
    assert gateway.admin("POST", "/tenants", json={"id": "Bad_Name"}).json()["error"]["code"] == "invalid_name"
    assert "gamma" in {t["id"] for t in gateway.admin("GET", "/tenants").json()["data"]}
    patched = gateway.admin("PATCH", "/tenants/gamma", json={"limits": {"requests_per_minute": 60}})
    assert patched.json()["limits"]["requests_per_minute"] == 60
    assert gateway.admin("PATCH", "/tenants/gamma", json={"default_adapter": "nope"}).status_code == 404

    assert gateway.client(key).models.list().data
    key_id = key.split("-")[1]
    listed = gateway.admin("GET", "/tenants/gamma/keys").json()["data"]
    assert [k["id"] for k in listed] == [key_id] and listed[0]["key"] is None  # the secret is never shown again
    assert gateway.admin("DELETE", f"/tenants/gamma/keys/{key_id}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        gateway.client(key).models.list()
    assert gateway.admin("DELETE", "/tenants/gamma").status_code == 204
    assert gateway.admin("GET", "/tenants/gamma").status_code == 404


def test_upload_hot_swap_and_rollback(gateway, peft_adapters):
    key = new_tenant(gateway, "delta")
    client = gateway.client(key)
    base = answer(client, gateway.settings.served_model_name)

    first = upload_archive(gateway, "delta", "helper", tar_gz(peft_adapters[0]))
    assert first.status_code == 201, first.text
    assert first.json()["active_version"] == 1
    assert "delta--helper--v1" in gateway.engine_models()  # loaded before the response: no cold start
    v1 = answer(client, "helper")
    assert v1 != base

    second = upload_files(gateway, "delta", "helper", peft_adapters[1])
    assert second.status_code == 201, second.text
    assert second.json()["active_version"] == 2
    v2 = answer(client, "helper")
    assert v2 != v1 and answer(client, "helper@1") == v1

    rolled = gateway.admin("POST", "/tenants/delta/adapters/helper/activate", json={"version": 1})
    assert rolled.status_code == 200 and rolled.json()["active_version"] == 1
    assert answer(client, "helper") == v1
    assert gateway.admin("POST", "/tenants/delta/adapters/helper/activate", json={"version": 9}).status_code == 404

    detail = gateway.admin("GET", "/tenants/delta/adapters/helper").json()
    manifests = {v["version"]: v["manifest"] for v in detail["versions"]}
    assert manifests[2]["source"] == "upload" and manifests[2]["rank"] == 8
    assert set(manifests[2]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_running_stream_finishes_on_the_version_it_started_on(gateway, peft_adapters):
    key = new_tenant(gateway, "epsilon")
    client = gateway.client(key)
    assert upload_files(gateway, "epsilon", "bot", peft_adapters[0]).status_code == 201
    expected = answer(client, "bot", max_tokens=96)

    stream = client.chat.completions.create(model="bot", messages=PROMPT, max_tokens=96, temperature=0, stream=True)
    pieces = [next(stream).choices[0].delta.content or ""]
    assert upload_files(gateway, "epsilon", "bot", peft_adapters[1]).status_code == 201  # v2 now active
    pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected

    deadline = time.monotonic() + 10  # v1 is unloaded once that stream is done
    while "epsilon--bot--v1" in gateway.engine_models():
        assert time.monotonic() < deadline, "the replaced version was never unloaded"
        time.sleep(0.2)
    assert "epsilon--bot--v2" in gateway.engine_models()


def test_delete_version_and_adapter(gateway, peft_adapters):
    key = new_tenant(gateway, "zeta")
    client = gateway.client(key)
    for folder in peft_adapters:
        assert upload_files(gateway, "zeta", "tool", folder).status_code == 201
    folder = gateway.settings.registry_path / "zeta" / "tool"
    assert gateway.admin("DELETE", "/tenants/zeta/adapters/tool/versions/2").status_code == 409  # active
    assert gateway.admin("DELETE", "/tenants/zeta/adapters/tool/versions/1").status_code == 204
    assert not (folder / "1").exists() and (folder / "2").exists()
    with pytest.raises(openai.NotFoundError):
        answer(client, "tool@1")
    assert gateway.admin("PATCH", "/tenants/zeta", json={"default_adapter": "tool"}).status_code == 200
    answer(client, "default")

    assert gateway.admin("DELETE", "/tenants/zeta/adapters/tool").status_code == 204
    with pytest.raises(openai.NotFoundError):
        answer(client, "tool")
    assert not folder.exists()
    assert {m.id for m in client.models.list().data} == {gateway.settings.served_model_name}
    assert gateway.admin("GET", "/tenants/zeta").json()["default_adapter"] is None
    deadline = time.monotonic() + 10
    while any(m.startswith("zeta--") for m in gateway.engine_models()):
        assert time.monotonic() < deadline, "a deleted adapter stayed loaded on the engine"
        time.sleep(0.2)
    # The number is never reused: a new upload under the same name is version 3.
    assert upload_files(gateway, "zeta", "tool", peft_adapters[0]).json()["active_version"] == 3


def test_concurrent_uploads_get_distinct_versions(gateway, peft_adapters):
    new_tenant(gateway, "eta")
    results = []

    def upload(i):
        results.append(upload_files(gateway, "eta", "same", peft_adapters[i % 2]))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [201] * 4, [r.text for r in results]
    detail = gateway.admin("GET", "/tenants/eta/adapters/same").json()
    assert sorted(v["version"] for v in detail["versions"]) == [1, 2, 3, 4]
    digests = {v["manifest"]["files"]["adapter_model.safetensors"]["sha256"] for v in detail["versions"]}
    assert len(digests) == 2  # each version holds exactly one of the two uploads, whole
    assert list(gateway.settings.registry_path.joinpath(".staging").iterdir()) == []


def test_admin_sees_only_the_named_tenants_adapters(gateway):
    """Beta's `legal` is neither readable nor listed under alpha. (Other modules add adapters to alpha on the
    shared gateway, so the listing is checked for what must and must not be there, not for equality.)"""
    assert gateway.admin("GET", "/tenants/alpha/adapters/legal").status_code == 404  # beta's
    names = {a["name"] for a in gateway.admin("GET", "/tenants/alpha/adapters").json()["data"]}
    assert "support" in names and "legal" not in names, names


def test_audit_log_records_actions_and_refusals(gateway):
    gateway.admin("POST", "/tenants", json={"id": "theta"})
    gateway.admin("POST", "/tenants", json={"id": "theta"})  # refused: exists
    made = gateway.admin("POST", "/tenants/theta/keys").json()
    records = gateway.admin("GET", "/audit", params={"limit": 10}).json()["data"]
    mine = [(r["action"], r["object"], r["result"]) for r in records if r["object"] == "theta"]
    assert ("tenant.create", "theta", "ok") in mine
    assert ("tenant.create", "theta", "refused 409") in mine
    assert ("key.create", "theta", "ok") in mine
    assert all(r["actor"] == "env-admin" and r["at"] for r in records)
    assert made["key"] not in str(records)
