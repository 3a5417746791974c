"""Byte counts as BIGINT, worker ids up to 128 characters: sizes PostgreSQL enforces and SQLite ignores.

An adapter or a training file may pass 2 GiB, and a worker id is `host:pid` with a host name of up to 64.

On SQLite the tables are rebuilt (batch mode); `server.storage.migrations.upgrade` turns foreign keys off around it,
so rebuilding `fine_tuning_jobs` does not cascade into its events.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_CHANGES = [
    ("adapter_versions", "size_bytes", sa.Integer(), sa.BigInteger(), False),
    ("files", "bytes", sa.Integer(), sa.BigInteger(), False),
    ("fine_tuning_jobs", "worker_id", sa.String(64), sa.String(128), True),
]


def upgrade() -> None:
    for table, column, old, new, nullable in _CHANGES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, existing_type=old, type_=new, existing_nullable=nullable)


def downgrade() -> None:
    for table, column, old, new, nullable in _CHANGES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, existing_type=new, type_=old, existing_nullable=nullable)
