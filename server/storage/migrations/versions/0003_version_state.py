"""Adapter versions record whether an engine has loaded them (`state`) and what a refusal falls back to.

Existing versions were already served, so they start `verified`.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapter_versions", sa.Column("state", sa.String(16), nullable=False, server_default="verified"))
    op.add_column("adapter_versions", sa.Column("fallback_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("fallback_version")
        batch.drop_column("state")
