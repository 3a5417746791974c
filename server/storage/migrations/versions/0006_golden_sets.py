"""Golden sets: an adapter's evaluation file and promotion policy, each version's evaluation report and whether
its promotion waits for one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("golden_set", sa.String(64), nullable=True))
    op.add_column("adapters", sa.Column("promotion", sa.String(32), nullable=False, server_default="always"))
    op.add_column("adapters", sa.Column("max_forgetting", sa.Float(), nullable=True))
    op.add_column("adapter_versions", sa.Column("evaluation", sa.JSON(), nullable=True))
    op.add_column("adapter_versions", sa.Column("promotion_due", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("promotion_due")
        batch.drop_column("evaluation")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("max_forgetting")
        batch.drop_column("promotion")
        batch.drop_column("golden_set")
