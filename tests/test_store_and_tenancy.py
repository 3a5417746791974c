"""The database, the naming rule and the model-name rule, on a real SQLite file and registry folder."""

from __future__ import annotations

import json
import os
import time

import pytest

from adapters.names import check_name, engine_name, is_valid_name
from adapters.registry import Registry
from adapters.validate import BaseModelSpec
from server.config import Settings
from server.errors import Forbidden, ModelNotFound, Unauthorized
from server.serving.tenancy import authenticate_tenant, resolve_model
from server.storage.store import Store
from tests.adapter_files import write_adapter
from tests.base_files import write_fake_base


@pytest.fixture
def world(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model_path=write_fake_base(tmp_path / "model"),
                        default_model_alias="my-model")
    store = Store(settings.db_url)
    store.create_schema()
    registry = Registry(settings.registry_path, store, BaseModelSpec(
        settings.base_model_id, settings.served_model_name, settings.model_path, max_rank=16))
    registry.prepare()
    for tenant in ("acme", "globex"):
        store.create_tenant(tenant)
    registry.publish(write_adapter(tmp_path / "a"), "acme", "bot", origin="test")
    registry.publish(write_adapter(tmp_path / "b"), "acme", "bot", origin="test")
    registry.publish(write_adapter(tmp_path / "c"), "globex", "secret", origin="test")
    return settings, store, registry


@pytest.mark.parametrize("name", ["a", "acme", "team-7", "x" * 63])
def test_valid_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a--b", "a_b", "a/b", "..", "x" * 64, "é", "a\x00", "a\n"])
def test_invalid_names(name):
    assert not is_valid_name(name)
    with pytest.raises(ValueError):
        check_name(name, "adapter")


def test_engine_names_cannot_collide():
    # With `--` forbidden in names, the internal name maps back to one tenant and adapter only.
    assert engine_name("a", "b-c", 1) == "a--b-c--v1"
    with pytest.raises(ValueError):
        engine_name("a--b", "c", 1)


def test_keys_are_stored_hashed_and_checked(world, tmp_path):
    _, store, _ = world
    key_id, secret = store.create_key("acme")
    assert store.identify(secret).tenant_id == "acme"
    assert store.identify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.identify(f"ls-{key_id}-guess") is None and store.identify("garbage") is None
    store.engine.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("loraserve.db*"))
    assert secret.encode() not in raw and secret.split("-", 2)[2].encode() not in raw


def test_authentication_rules(world):
    settings, store, _ = world
    _, acme_key = store.create_key("acme")
    assert authenticate_tenant(settings, store, f"Bearer {acme_key}", None).id == "acme"
    assert authenticate_tenant(settings, store, f"bearer {acme_key}", "acme").id == "acme"
    with pytest.raises(Forbidden):
        authenticate_tenant(settings, store, f"Bearer {acme_key}", "globex")
    for header in (None, "", "Bearer", f"Basic {acme_key}", "Bearer nope"):
        with pytest.raises(Unauthorized):
            authenticate_tenant(settings, store, header, None)
    trusting = settings.model_copy(update={"auth_mode": "header"})
    assert authenticate_tenant(trusting, store, None, "globex").id == "globex"
    with pytest.raises(Unauthorized):
        authenticate_tenant(trusting, store, None, "nobody")


def test_model_name_rule(world):
    settings, store, registry = world
    acme = store.get_tenant("acme")
    base = settings.served_model_name
    assert resolve_model(settings, store, registry, acme, base).engine_model == base
    for alias in ("default", "acme", "my-model"):
        assert resolve_model(settings, store, registry, acme, alias).adapter is None  # no default yet
    route = resolve_model(settings, store, registry, acme, "bot")
    assert (route.engine_model, route.version, route.requested) == ("acme--bot--v2", 2, "bot")
    assert resolve_model(settings, store, registry, acme, "bot@1").engine_model == "acme--bot--v1"
    assert route.path == settings.registry_path / "acme" / "bot" / "2"
    store.update_tenant("acme", default_adapter="bot")
    acme = store.get_tenant("acme")
    assert resolve_model(settings, store, registry, acme, "default").engine_model == "acme--bot--v2"
    for missing in ("secret", "secret@1", "bot@3", "bot@0", "bot@x", "globex--secret--v1", "../globex/secret", ""):
        with pytest.raises(ModelNotFound):
            resolve_model(settings, store, registry, acme, missing)


def test_concurrent_publishes_get_distinct_versions(world, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _, store, registry = world
    sources = [write_adapter(tmp_path / f"src{i}", rank=2 + i % 3) for i in range(8)]
    for name in ("fresh", "again", "third"):  # the race on a new adapter's first row is timing-dependent
        with ThreadPoolExecutor(8) as pool:
            published = list(pool.map(lambda src, n=name: registry.publish(src, "globex", n, origin="test"), sources))
        assert sorted(p.version for p in published) == list(range(1, 9))
        for p in published:  # each version holds the upload it was given, whole
            assert p.manifest["rank"] == int(json.loads((p.path / "adapter_config.json").read_text())["r"])
        assert store.get_adapter("globex", name).versions == tuple(range(1, 9))
    assert list(registry.staging.iterdir()) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.5", "::1"])
def test_engine_may_listen_privately(host):
    assert Settings(_env_file=None, engine_host=host).engine_host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8", "engine.example.com"])
def test_engine_may_not_listen_publicly(host):
    with pytest.raises(ValueError, match="engine"):
        Settings(_env_file=None, engine_host=host)
    with pytest.raises(ValueError, match="LORASERVE_ENGINE_HOST"):
        Settings(_env_file=None, engine_extra_args="--host 0.0.0.0")


def test_a_cpu_cache_smaller_than_the_engine_slots_is_refused_before_the_engine_starts():
    """vLLM would fail at start with a message about its own flags; the setting names what to change."""
    with pytest.raises(ValueError, match=r"engine_max_cpu_loras \(16\) must be at least engine_max_loras \(32\)"):
        Settings(_env_file=None, engine_max_loras=32, engine_max_cpu_loras=16)
    assert Settings(_env_file=None, engine_max_loras=32, engine_max_cpu_loras=32).engine_max_loras == 32


def test_start_up_sweeps_only_stale_staging_leftovers(world):
    """A crashed publish's leftovers go; another gateway's publish in progress on a shared registry stays."""
    _, _, registry = world
    stale, fresh = registry.staging / "publish-crashed", registry.staging / "publish-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    registry.prepare()
    assert not stale.exists()
    assert (fresh / "adapter_model.safetensors").read_bytes() == b"partial"
