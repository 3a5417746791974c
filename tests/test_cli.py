"""The `loraserve` command: first-run set-up, tenants, keys and adapters, on a real SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys

from server.cli import first_run_setup
from server.config import Settings
from server.storage.factory import build_store
from tests.adapter_files import write_adapter
from tests.base_files import write_fake_base


def loraserve(data_dir, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    env["LORASERVE_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_first_run_makes_a_demo_tenant_and_an_admin_key_once(tmp_path, capsys):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    store = build_store(settings)
    first_run_setup(settings, store)
    printed = capsys.readouterr().out
    demo_key, admin_key = [line.strip() for line in printed.splitlines() if line.strip().startswith("ls-")]
    assert store.identify(demo_key).tenant_id == "demo"
    assert store.identify(admin_key).is_admin
    first_run_setup(settings, store)  # a second start changes nothing and prints no secret
    assert "ls-" not in capsys.readouterr().out
    assert [t.id for t in store.list_tenants()] == ["demo"]


def test_configured_admin_key_means_none_is_made(tmp_path, capsys):
    settings = Settings(_env_file=None, data_dir=tmp_path, admin_key="from-the-environment")
    store = build_store(settings)
    first_run_setup(settings, store)
    assert not store.has_admin_key()
    assert "admin key" not in capsys.readouterr().out


def test_tenant_key_and_adapter_commands(tmp_path):
    data = tmp_path / "data"
    write_fake_base(data / "models" / "SmolLM2-135M-Instruct")  # where the default base model lives
    assert loraserve(data, "tenant", "create", "acme").returncode == 0
    made = loraserve(data, "key", "create", "--tenant", "acme")
    assert made.returncode == 0
    secret = made.stdout.strip().splitlines()[-1]
    published = loraserve(data, "adapter", "publish", str(write_adapter(tmp_path / "ad")), "--tenant", "acme",
                          "--name", "helper")
    assert published.returncode == 0, published.stderr
    assert "version 1" in published.stdout
    again = loraserve(data, "adapter", "publish", str(write_adapter(tmp_path / "ad2")), "--tenant", "acme",
                      "--name", "helper")
    assert "version 2" in again.stdout
    assert sorted(p.name for p in (data / "registry" / "acme" / "helper").iterdir()) == ["1", "2"]
    store = build_store(Settings(_env_file=None, data_dir=data))
    assert store.identify(secret).tenant_id == "acme"
    assert store.get_adapter("acme", "helper").active_version == 2
    assert loraserve(data, "tenant", "list").stdout.split() == ["acme"]


def test_commands_refuse_bad_input_clearly(tmp_path):
    data = tmp_path / "data"
    bad = loraserve(data, "tenant", "create", "Not_Valid")
    assert bad.returncode == 1 and "not valid" in bad.stderr and "Traceback" not in bad.stderr
    loraserve(data, "tenant", "create", "acme")
    dup = loraserve(data, "tenant", "create", "acme")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    nokey = loraserve(data, "key", "create", "--tenant", "nobody")
    assert nokey.returncode == 1 and "does not exist" in nokey.stderr
    pickle = write_adapter(tmp_path / "ad")
    (pickle / "adapter_model.bin").write_bytes(b"\x80\x04")
    refused = loraserve(data, "adapter", "publish", str(pickle), "--tenant", "acme", "--name", "x")
    assert refused.returncode == 1 and "pickle" in refused.stderr
    assert not (data / "registry" / "acme").exists()
    assert list((data / "registry" / ".staging").iterdir()) == []
