"""Schema migrations (Alembic), run in code: every gateway, worker and CLI command brings the database to
the newest revision when it opens it (`Store.create_schema`), and `loraserve db upgrade` does it on its own.

No alembic.ini: the configuration is built here, and the Store's own connection is handed to `env.py`, so
the URL is never parsed twice. On PostgreSQL the upgrade is one transaction holding an advisory lock, so
gateways that start together migrate one after the other (the later ones find the work done). A database made before
migrations existed (by `create_all`: the tables, no `alembic_version`) is stamped at the initial revision.

A new revision: change `server/storage/db.py`, then let Alembic draft the migration against an up-to-date database
(`command.revision(alembic_config(conn), "what changed", rev_id="0003", autogenerate=True)` with a Store's
connection), review it, and keep SQLite in mind (column changes need `op.batch_alter_table`).
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from server.storage.db import Base

FOLDER = Path(__file__).resolve().parent
INITIAL = "0001"
LOCK_KEY = zlib.crc32(b"loraserve.migrations")  # the advisory lock's key: any constant number
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # seven lines at every start otherwise


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(FOLDER).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database to `revision`; returns the revision it is at afterwards."""
    with engine.connect() as conn, _sqlite_foreign_keys_off(conn):
        if conn.dialect.name == "postgresql":
            # One migrating process at a time. The whole upgrade is this one transaction (PostgreSQL's DDL is
            # transactional), and the lock lasts until it ends: a waiting gateway then finds the work done.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and "tenants" in tables:
            # Made by create_all before migrations: tables it lacks are made as create_all would have.
            Base.metadata.create_all(conn)
            command.stamp(alembic_config(conn), INITIAL)
        before = current(conn)
        command.upgrade(alembic_config(conn), revision)
        after = current(conn)
        if after != before and conn.dialect.name == "sqlite":
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        conn.commit()
        return after


@contextlib.contextmanager
def _sqlite_foreign_keys_off(conn: Connection) -> Iterator[None]:
    """SQLite rebuilds a table to change a column (drop, then rename a copy): with foreign keys on, dropping
    `fine_tuning_jobs` would delete its events. The pragma only takes effect outside a transaction."""
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.commit()
