"""Fine-tuning jobs keep the tenant's metadata, their result files and their epoch checkpoints.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("fine_tuning_jobs", sa.Column("metadata", sa.JSON(), nullable=True))
    op.add_column("fine_tuning_jobs", sa.Column("result_files", sa.JSON(), nullable=True))
    op.add_column("fine_tuning_jobs", sa.Column("checkpoints", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("checkpoints")
        batch.drop_column("result_files")
        batch.drop_column("metadata")
