"""PostgreSQL: Alembic's schema equals db.py (and SQLite's), old create_all databases are adopted, the store
holds under concurrency from several processes, and two gateway processes share one database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Integer, MetaData, String, func, make_url, select

from server.storage.db import AdapterVersion, Base, Job, JobEvent, utcnow
from server.storage.jobstore import JobStore
from server.storage.migrations import INITIAL, LOCK_KEY, alembic_config, head
from server.storage.store import Conflict, Missing, Store
from tests.conftest import ADMIN_KEY, REPO, make_peft_adapter, wait_until_ok
from tests.gateway_processes import killing, start_gateway

pytest_plugins = ["tests.postgres"]

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'loraserve.db'}"
    return request.getfixturevalue("postgres_url")


def schema_diff(store: Store) -> list:
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def changed_columns(diff: list) -> set[tuple[str, str]]:
    """(table, column) of each column-type difference Alembic reports."""
    flat = [c for d in diff for c in (d if isinstance(d, list) else [d])]
    return {(c[2], c[3]) for c in flat if c[0] == "modify_type"}


@pytest.mark.parametrize("db_url", BACKENDS, indirect=True)
def test_migrations_make_exactly_the_tables_of_db_py(db_url):
    store = Store(db_url)
    assert store.create_schema() == head()
    assert schema_diff(store) == []
    assert store.create_schema() == head()  # a second start changes nothing
    with store.engine.connect() as conn:  # the comparison does see a difference: the first revision is not db.py
        command.downgrade(alembic_config(conn), INITIAL)
        conn.commit()
    assert changed_columns(schema_diff(store)) == {
        ("adapter_versions", "size_bytes"), ("files", "bytes"), ("fine_tuning_jobs", "worker_id")}
    assert store.create_schema() == head() and schema_diff(store) == []


def legacy_tables() -> MetaData:
    """The tables as `create_all` made them before migrations existed (before revision 0002 widened three)."""
    legacy = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(legacy)
    legacy.tables["adapter_versions"].c.size_bytes.type = Integer()
    legacy.tables["files"].c.bytes.type = Integer()
    legacy.tables["fine_tuning_jobs"].c.worker_id.type = String(64)
    versions = legacy.tables["adapter_versions"]
    for added_by_later in ("state", "fallback_version", "evaluation", "promotion_due"):  # 0003, 0006
        versions._columns.remove(versions.c[added_by_later])
    adapters = legacy.tables["adapters"]
    for added_by_later in ("golden_set", "promotion", "max_forgetting", "canary"):  # 0006, 0007
        adapters._columns.remove(adapters.c[added_by_later])
    jobs = legacy.tables["fine_tuning_jobs"]
    for added_by_later in ("metadata", "result_files", "checkpoints", "method"):  # 0004, 0005
        jobs._columns.remove(jobs.c[added_by_later])
    return legacy


@pytest.mark.parametrize("db_url", BACKENDS, indirect=True)
def test_a_database_made_by_create_all_is_stamped_then_upgraded_with_its_rows(db_url):
    store = Store(db_url)
    legacy = legacy_tables()
    legacy.create_all(store.engine)
    store.create_tenant("acme")
    _, secret = store.create_key("acme")
    version = store.reserve_version("acme", "bot")
    with store.engine.begin() as conn:  # written as the code of that time did: no columns of later revisions
        adapter_id = conn.execute(legacy.tables["adapters"].insert().values(
            tenant_id="acme", name="bot", active_version=version, created_at=utcnow())).inserted_primary_key[0]
        conn.execute(legacy.tables["adapter_versions"].insert().values(
            adapter_id=adapter_id, version=version, rank=8, size_bytes=1234, source="test", created_at=utcnow()))
        conn.execute(legacy.tables["fine_tuning_jobs"].insert().values(
            id="ftjob-legacy", tenant_id="acme", model="m", training_file="file-1", suffix="bot", status="queued",
            hyperparameters={}, lora={}, seed=0, cancel_requested=False, created_at=utcnow()))
        for message in ("Created fine-tuning job.", "second event"):
            conn.execute(legacy.tables["fine_tuning_job_events"].insert().values(
                job_id="ftjob-legacy", level="info", type="message", message=message, created_at=utcnow()))
    jobs = JobStore(store)

    assert store.create_schema() == head()
    assert schema_diff(store) == []
    assert store.identify(secret).tenant_id == "acme"
    assert store.get_adapter("acme", "bot").versions == (1,)
    with store.session() as s:  # served before the state column existed: verified
        assert s.scalar(select(AdapterVersion.state)) == "verified"
    with store.session() as s:  # SQLite rebuilt fine_tuning_jobs: its events must not have cascaded away
        assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == "ftjob-legacy")) == 2
    assert jobs.get_job("acme", "ftjob-legacy").method == "supervised", "jobs from before DPO were supervised"
    # the widened columns now take what they are for
    store.add_version("acme", "bot", store.reserve_version("acme", "bot"), rank=8, size_bytes=5 << 30, source="t")
    jobs.set_status("ftjob-legacy", "running", worker_id="h" * 64 + ":4194304")
    assert store.get_adapter("acme", "bot").version_details[-1].size_bytes == 5 << 30


def test_store_on_postgres(postgres_url):
    store = Store(postgres_url)
    store.create_schema()
    store.create_tenant("acme", limits={"requests_per_minute": 5})
    with pytest.raises(Conflict):
        store.create_tenant("acme")
    key_id, secret = store.create_key("acme")
    identity = store.identify(secret)
    assert identity.tenant_id == "acme" and identity.tenant.limits == {"requests_per_minute": 5}
    assert store.identify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.create_key(None)[1] and store.has_admin_key()
    # Ids from the outside with NUL (which PostgreSQL text cannot hold) read as absent, not as a server error
    assert store.identify(f"ls-{key_id}\x00-x") is None and store.get_tenant("a\x00") is None
    with pytest.raises(Missing):
        store.revoke_key("acme", "\x00")
    with pytest.raises(Missing):
        JobStore(store).get_job("acme", "ftjob-\x00")
    store.audit("admin\x00", "key.revoke", "acme/\x00", "not_found", "detail\x00")
    assert store.audit_log(1)[0][0].object == "acme/\ufffd"
    store.revoke_key("acme", key_id)
    assert store.identify(secret) is None
    created = store.list_keys("acme")[0].created_at
    assert created.tzinfo is not None  # timestamptz: aware datetimes come back


RESERVE = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from server.storage.store import Store
store = Store(sys.argv[1])
store.ping()
print("ready", flush=True)
sys.stdin.readline()
with ThreadPoolExecutor(4) as pool:
    print(json.dumps(list(pool.map(lambda _: store.reserve_version("acme", "bot"), range(40)))))
"""

CLAIM = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from server.storage.jobstore import JobStore
from server.storage.store import Store
store = Store(sys.argv[1])
jobs = JobStore(store)
store.ping()
print("ready", flush=True)
sys.stdin.readline()
def drain(worker):
    claimed = []
    while (job := jobs.claim_next(f"{sys.argv[2]}-{worker}")) is not None:
        claimed.append(job.id)
    return claimed
with ThreadPoolExecutor(4) as pool:
    print(json.dumps([j for batch in pool.map(drain, range(4)) for j in batch]))
"""


def run_together(code: str, *argv_sets: list[str]) -> list:
    """One Python process per argv set; once all are connected ("ready"), all are let go at once. Their
    JSON outputs."""
    processes = [subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
                 for argv in argv_sets]
    with killing(*processes):
        for process in processes:
            assert process.stdout.readline() == "ready\n", process.communicate()[1][-3000:]
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = []
        for process in processes:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, err[-3000:]
            outputs.append(json.loads(out))
        return outputs


def test_two_processes_never_reserve_the_same_version(postgres_url):
    Store(postgres_url).create_schema()
    Store(postgres_url).create_tenant("acme")
    first, second = run_together(RESERVE, [postgres_url], [postgres_url])
    assert sorted(first + second) == list(range(1, 81))
    assert Store(postgres_url).reserve_version("acme", "bot") == 81


def test_two_workers_never_claim_the_same_job(postgres_url):
    store = Store(postgres_url)
    store.create_schema()
    store.create_tenant("acme")
    jobs = JobStore(store)
    made = [jobs.create_job(tenant_id="acme", model="m", training_file="f", suffix=f"s{i}", status="queued").id
            for i in range(150)]
    first, second = run_together(CLAIM, [postgres_url, "a"], [postgres_url, "b"])
    assert first and second, "both workers should have claimed jobs"
    assert len(first + second) == len(set(first + second)) == 150 and set(first + second) == set(made)
    with store.session() as s:
        owners = dict(s.execute(select(Job.id, Job.worker_id)).all())
    assert {owners[j][0] for j in first} == {"a"} and {owners[j][0] for j in second} == {"b"}
    assert jobs.claim_next("c") is None


def test_gateways_starting_together_migrate_one_after_the_other(postgres_server, postgres_url):
    """Three `loraserve db upgrade` started while the migration lock is held all wait for it, then all succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    env["LORASERVE_DATABASE_URL"] = postgres_url
    dbname = make_url(postgres_url).database
    with postgres_server.superuser(dbname) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        processes = [subprocess.Popen([sys.executable, "-m", "server.cli", "db", "upgrade"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        deadline = time.monotonic() + 60
        while _lock_waiters(holder) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
                [p.communicate()[1][-2000:] for p in processes if p.poll() is not None]
            time.sleep(0.1)
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        assert f"schema revision {head()}" in out and postgres_server.password not in out
    store = Store(postgres_url)
    assert schema_diff(store) == []
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1


def _lock_waiters(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0]


def test_two_gateways_share_one_postgres_database(gateway, base_model_path, postgres_url, tmp_path):
    registry = tmp_path / "registry"
    one, url1, log1 = start_gateway(tmp_path, "one", gateway.engine_url, postgres_url, registry, base_model_path)
    two, url2, log2 = start_gateway(tmp_path, "two", gateway.engine_url, postgres_url, registry, base_model_path)
    with killing(one, two):
        source = make_peft_adapter(base_model_path, tmp_path / "adapter", seed=41)  # while both start
        wait_until_ok(f"{url1}/readyz", one, log1, timeout=180)
        wait_until_ok(f"{url2}/readyz", two, log2, timeout=180)

        def admin(url: str, method: str, path: str, **kwargs) -> httpx.Response:
            return httpx.request(method, f"{url}/admin{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                 timeout=120, **kwargs)

        def upload(url: str) -> httpx.Response:
            files = [("files", (p.name, p.read_bytes())) for p in sorted(source.iterdir())]
            return admin(url, "POST", "/tenants/pgshared/adapters", data={"name": "bot"}, files=files)

        def client(url: str, key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)

        def answer(url: str, key: str) -> str:
            return client(url, key).chat.completions.create(
                model="bot", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0,
            ).choices[0].message.content

        assert admin(url1, "POST", "/tenants", json={"id": "pgshared"}).status_code == 201
        made = admin(url1, "POST", "/tenants/pgshared/keys")
        assert made.status_code == 201
        key, key_id = made.json()["key"], made.json()["id"]
        first = upload(url1)
        assert first.status_code == 201 and first.json()["active_version"] == 1, first.text

        # Gateway 2 knows the tenant, the key and the adapter at once, and serves it as gateway 1 does.
        via_two = answer(url2, key)
        assert via_two and via_two == answer(url1, key)
        assert "bot" in {m.id for m in client(url2, key).models.list().data}
        # Versions come from one sequence: gateway 2's upload is version 2, and gateway 1 sees it.
        second = upload(url2)
        assert second.status_code == 201 and second.json()["active_version"] == 2, second.text
        listed = admin(url1, "GET", "/tenants/pgshared/adapters/bot").json()
        assert [v["version"] for v in listed["versions"]] == [1, 2] and listed["active_version"] == 2
        assert answer(url1, key)
        text = httpx.get(f"{url2}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        scraped = {(m.name, m.labels.get("tenant")): m.value
                   for f in text_string_to_metric_families(text) for m in f.samples}
        assert scraped["loraserve_registry_bytes", "pgshared"] == sum(v["size_bytes"] for v in listed["versions"])

        # A key revoked through gateway 2 is refused by gateway 1 at once.
        assert admin(url2, "DELETE", f"/tenants/pgshared/keys/{key_id}").status_code == 204
        with pytest.raises(openai.AuthenticationError):
            client(url1, key).models.list()
        with pytest.raises(openai.AuthenticationError):
            answer(url2, key)
        assert admin(url1, "DELETE", "/tenants/pgshared").status_code == 204  # unloads it from the shared engine
    for log in (log1, log2):
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]
    with Store(postgres_url).session() as s:
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 0
