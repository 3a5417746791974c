"""Alembic's environment: runs on the connection `server.storage.migrations.upgrade` hands over in
`config.attributes["connection"]` (never a URL from an ini file), against the tables of `server.storage.db`."""

from __future__ import annotations

from alembic import context

from server.storage.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `loraserve db upgrade` (server.storage.migrations.upgrade), "
                       "not the alembic CLI")
context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
