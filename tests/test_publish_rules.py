"""Publish rules, offline: a real SQLite store and registry folder (issue 12, items 5, 7 and the low ones):
the newest version wins, folders are durable, untried versions are verified by their first load, quotas."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapter_files import write_adapter


@pytest.fixture
def local(tmp_path):
    from adapters.registry import Registry
    from adapters.validate import BaseModelSpec
    from server.storage.store import Store
    from tests.base_files import write_fake_base

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_schema()
    spec = BaseModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct",
                         write_fake_base(tmp_path / "base"), max_rank=16)
    registry = Registry(tmp_path / "registry", store, spec)
    registry.prepare()
    store.create_tenant("acme")
    return store, registry


def test_the_newest_version_wins_whatever_order_publishes_finish(local, tmp_path):
    """Version 3 recorded before version 2 (its publish finished first): 3 stays active. Before the fix
    activation followed completion order, so 2 became active. Failed before the fix."""
    store, registry = local
    registry.publish(write_adapter(tmp_path / "a"), "acme", "bot", origin="test")
    two, three = store.reserve_version("acme", "bot"), store.reserve_version("acme", "bot")
    for version in (three, two):
        store.add_version("acme", "bot", version, rank=4, size_bytes=1, source="test")
    assert store.get_adapter("acme", "bot").active_version == 3


def test_racing_publishes_end_with_the_highest_version_active(local, tmp_path):
    """Six publishes at once. Timing-dependent: it passed before the fix too (the test above forces the
    order); kept as the end-to-end form of the rule."""
    from concurrent.futures import ThreadPoolExecutor

    store, registry = local
    sources = [write_adapter(tmp_path / f"s{i}") for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        published = list(pool.map(lambda src: registry.publish(src, "acme", "race", origin="test"), sources))
    assert store.get_adapter("acme", "race").active_version == max(p.version for p in published) == 6


def test_new_folders_above_a_version_are_fsynced(local, tmp_path, monkeypatch):
    """A first publish makes the tenant's and the adapter's folders: the rename is durable only once the
    folders holding each new entry are fsynced (the registry root, the tenant's folder, the adapter's).
    Before the fix only the adapter's folder was. Failed before the fix."""
    from adapters import registry as registry_module

    _, registry = local
    synced = []
    real = registry_module._fsync_dir
    monkeypatch.setattr(registry_module, "_fsync_dir", lambda path: (synced.append(Path(path)), real(path)))
    published = registry.publish(write_adapter(tmp_path / "a"), "acme", "fresh", origin="test")
    adapter_dir = published.path.parent
    assert {adapter_dir, adapter_dir.parent, registry.root} <= set(synced)


def test_a_version_no_engine_tried_is_unverified_and_a_refusal_falls_back(local, tmp_path):
    """CLI publish, training job or engine down: the version is active but `unverified`; the first load
    decides. Refused: it is `refused`, never active again, and the adapter falls back to the version
    active before it (here 1, though 2 is newer: the operator had rolled back to 1). Failed before the fix
    (there was no such state: a version was active, tried or not)."""
    from server.storage.store import Conflict

    store, registry = local
    for name in "abc":
        registry.publish(write_adapter(tmp_path / name), "acme", "bot", origin="cli")
    states = {v.version: v.state for v in store.get_adapter("acme", "bot").version_details}
    assert states == {1: "unverified", 2: "unverified", 3: "unverified"}
    assert store.mark_verified("acme", "bot", 1) and store.mark_verified("acme", "bot", 2)
    store.activate("acme", "bot", 1)  # rolled back
    store.activate("acme", "bot", 3)  # then forward to the untried one
    assert store.refuse_version("acme", "bot", 3) == (True, 1)
    assert store.get_adapter("acme", "bot").active_version == 1
    assert store.refuse_version("acme", "bot", 3) is None  # decided once
    assert store.refuse_version("acme", "bot", 2) is None  # verified versions are never refused after the fact
    with pytest.raises(Conflict, match="refused"):
        store.activate("acme", "bot", 3)
    # The only version of an adapter refused: nothing is active (NAME answers 404, not a broken adapter).
    registry.publish(write_adapter(tmp_path / "d"), "acme", "solo", origin="cli")
    assert store.refuse_version("acme", "solo", 1) == (True, None)


def test_adapter_quotas_refuse_with_nothing_left_behind(local, tmp_path):
    """Per-tenant quotas: adapters (names) and bytes of all versions. Failed before the fix (no quota)."""
    from adapters.registry import AdapterQuota
    from server.storage.store import OverQuota

    store, registry = local
    source = write_adapter(tmp_path / "a")
    size = sum(p.stat().st_size for p in source.iterdir() if p.name != "README.md")
    registry.quota = AdapterQuota(max_adapters=1, max_bytes=2 * size)
    registry.publish(source, "acme", "one", origin="test")
    with pytest.raises(OverQuota, match="1 adapters") as caught:
        registry.publish(source, "acme", "two", origin="test")
    assert caught.value.what == "adapters"
    assert not (registry.root / "acme" / "two").exists() and store.get_adapter("acme", "two") is None
    registry.publish(source, "acme", "one", origin="test")  # a new version of the same adapter: fine
    with pytest.raises(OverQuota, match="bytes") as caught:
        registry.publish(source, "acme", "one", origin="test")
    assert caught.value.what == "adapter_bytes"
    assert store.get_adapter("acme", "one").versions == (1, 2)
    assert sorted(p.name for p in (registry.root / "acme" / "one").iterdir()) == ["1", "2"]
