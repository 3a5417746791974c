"""The database connection: the engine for a URL (SQLite or PostgreSQL), and what every table store shares.

SQLite runs in WAL mode, so the CLI and a running server share the file; PostgreSQL URLs mean psycopg 3.
"""

from __future__ import annotations

from sqlalchemy import URL, create_engine, event, make_url
from sqlalchemy.engine import Engine

# The row lock of read-modify-write methods: FOR NO KEY UPDATE on PostgreSQL (rows that reference the locked
# one can still be added), nothing on SQLite.
ROW_LOCK = {"key_share": True}


def has_nul(*values: str | None) -> bool:
    """PostgreSQL text cannot hold NUL: an id with one is one that does not exist (on any database)."""
    return any(v is not None and "\x00" in v for v in values)


def storable(value: str) -> str:
    """Free text as PostgreSQL can store it (and SQLite the same): NUL becomes U+FFFD."""
    return value.replace("\x00", "\ufffd")


def database_url(url: str | URL) -> URL:
    """The URL with its driver made explicit: `postgresql://` and `postgres://` mean psycopg 3 (the driver
    loraserve installs; SQLAlchemy's default, psycopg2, is not)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def build_engine(url: str | URL) -> Engine:
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    options: dict = {}
    if backend == "postgresql":
        # Requests run store calls in a thread pool: a few connections kept, more lent under load, recycled
        # now and then (load balancers and PgBouncer drop idle ones); pre-ping replaces a dead one.
        options = {"pool_size": 5, "max_overflow": 15, "pool_timeout": 30, "pool_recycle": 1800}
        if parsed.get_driver_name() in ("psycopg", "psycopg2"):
            libpq = {"connect_timeout": 10, "application_name": "loraserve"}
            options["connect_args"] = {k: v for k, v in libpq.items() if k not in parsed.query}
    return create_engine(parsed, pool_pre_ping=True, **options)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
