"""client failures

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 07:18:39.989216
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this migration."""
    op.create_table(
        "client_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("client_identifier", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "round_number IS NULL OR round_number >= 0",
            name=op.f("ck_client_failures_round_number_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_client_failures_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_failures")),
        sa.UniqueConstraint(
            "run_id", "round_number", "node_id", name="uq_client_failures_round_node"
        ),
    )
    op.create_index(
        op.f("ix_client_failures_run_id"), "client_failures", ["run_id"], unique=False
    )


def downgrade() -> None:
    """Revert this migration."""
    op.drop_index(op.f("ix_client_failures_run_id"), table_name="client_failures")
    op.drop_table("client_failures")
