"""Deleting an adapter version while requests run on it (issue 12, item 10): the name is gone at once,
its files only once no engine holds it; and the registry's start-up sweep of what a crash left.

The end-to-end test runs on the real gateway and engine; the sweep tests on a registry of their own.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from adapters.registry import Registry
from adapters.validate import BaseModelSpec
from server.config import Settings
from server.storage.store import Store
from tests.adapter_files import write_adapter
from tests.base_files import write_fake_base
from tests.conftest import exactly, make_peft_adapter
from tests.test_admin import new_tenant, upload_files
from tests.test_hostile_tenant import engine_counter

PROMPT = [{"role": "user", "content": "Write a long story about the sea."}]
STREAM_TOKENS = 1000


def test_deleting_a_version_lets_its_running_stream_finish_and_removes_its_files_afterwards(
        gateway, tmp_path, base_model_path):
    """The version's folder was removed the moment the delete came, under a stream still running on it
    (vLLM re-reads it when it evicts the adapter from its CPU cache). Failed before the fix (the folder was
    gone during the stream); now the stream finishes, the name 404s at once, and the folder goes after."""
    key = new_tenant(gateway, "omicron")
    source = make_peft_adapter(base_model_path, tmp_path / "adapter", seed=42)
    assert upload_files(gateway, "omicron", "writer", source).status_code == 201
    folder = gateway.settings.registry_path / "omicron" / "writer" / "1"
    headers = {"Authorization": f"Bearer {key}"}
    # Long enough that the engine is still generating when the files are checked: the gateway relays into
    # socket buffers that hold a whole short stream, so a short one can end on the engine before the delete.
    body = {"model": "writer", "messages": PROMPT, "stream": True, "temperature": 0, **exactly(STREAM_TOKENS)}

    with httpx.Client(timeout=120) as client, client.stream(
            "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line.startswith("data:"))
        events = [next(lines) for _ in range(3)]
        assert gateway.admin("DELETE", "/tenants/omicron/adapters/writer").status_code == 204
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", headers=headers, timeout=120,
                             json={"model": "writer", "messages": PROMPT, "max_tokens": 4})
        assert refused.status_code == 404, "the deleted name still answered"
        assert (folder / "adapter_model.safetensors").exists(), "files removed under a running stream"
        assert engine_counter(gateway, "vllm:num_requests_running") >= 1, (
            "the stream had ended on the engine before the check, which then proved nothing: raise STREAM_TOKENS")
        events += list(lines)

    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data:")) for e in events[:-1]]
    assert not any("error" in c for c in chunks), "the stream broke after the delete"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert len(text) > 300, "the stream did not run to its end"

    deadline = time.monotonic() + 120  # liveness, not speed: the unload and removal follow the stream's end
    while folder.exists() or "omicron--writer--v1" in gateway.engine_models():
        assert time.monotonic() < deadline, "the deleted version was never unloaded and removed"
        time.sleep(0.3)
    assert not folder.parent.exists(), "the emptied adapter folder stayed"


@pytest.fixture
def registry(tmp_path) -> Registry:
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model_path=write_fake_base(tmp_path / "model"))
    store = Store(settings.db_url)
    store.create_schema()
    registry = Registry(settings.registry_path, store, BaseModelSpec(
        settings.base_model_id, settings.served_model_name, settings.model_path, max_rank=16))
    registry.prepare()
    store.create_tenant("acme")
    for source in ("a", "b"):
        registry.publish(write_adapter(tmp_path / source), "acme", "bot", origin="test")
    return registry


def age(path, seconds: float = 3700) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_start_up_sweep_removes_stale_deleted_versions_only(registry):
    """A gateway that stopped before the engines let go of a deleted version leaves its folder; the next
    start removes it once an hour old (another gateway sharing the registry may still hold a younger one),
    and never a version the database lists."""
    root = registry.root
    registry.store.delete_version("acme", "bot", 1)  # deleted, its folder left behind
    for folder in (root / "acme" / "bot" / "1", root / "acme" / "bot" / "2"):
        age(folder)
    gone_tenant = root / "initech" / "tool" / "3"  # a tenant deleted with all its rows
    gone_tenant.mkdir(parents=True)
    young = root / "acme" / "bot" / "7"  # deleted a minute ago (mark_deleted touched it), or being published
    young.mkdir()
    for folder in (gone_tenant, gone_tenant.parent, gone_tenant.parent.parent):
        age(folder)

    registry.prepare()
    assert not (root / "acme" / "bot" / "1").exists()
    assert (root / "acme" / "bot" / "2" / "manifest.json").exists(), "a listed version was swept"
    assert young.exists()
    assert not (root / "initech").exists()


def test_mark_deleted_protects_an_old_folder_from_another_gateways_sweep(registry):
    folder = registry.version_path("acme", "bot", 1)
    age(folder)
    registry.store.delete_version("acme", "bot", 1)
    registry.mark_deleted("acme", "bot", 1)
    registry.prepare()
    assert folder.exists()


def test_removing_the_last_version_removes_the_emptied_folders(registry):
    registry.remove("acme", "bot", 1)
    assert (registry.root / "acme" / "bot").exists()
    registry.remove("acme", "bot", 2)
    assert not (registry.root / "acme").exists()
    assert list(registry.staging.iterdir()) == []
