"""privacy: the budget spent per round, the run's privacy mode and stop reason

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 07:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("stop_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("privacy", sa.String(length=32), nullable=True))
    op.create_table(
        "privacy_spent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(precision=53), nullable=False),
        sa.Column("delta", sa.Float(precision=53), nullable=False),
        sa.Column("releases", sa.Integer(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(precision=53), nullable=False),
        sa.Column("clipping_norm", sa.Float(precision=53), nullable=True),
        sa.Column("sampled_clients", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "epsilon >= 0", name=op.f("ck_privacy_spent_epsilon_non_negative")
        ),
        sa.CheckConstraint(
            "delta > 0 AND delta < 1", name=op.f("ck_privacy_spent_delta_range")
        ),
        *(
            sa.CheckConstraint(
                f"{name} IS NULL OR {name} >= 0",
                name=op.f(f"ck_privacy_spent_{name}_non_negative"),
            )
            for name in ("round_number", "releases")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_privacy_spent_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_spent")),
        sa.UniqueConstraint("run_id", "round_number", name="uq_privacy_spent_round"),
    )
    op.create_index(
        op.f("ix_privacy_spent_run_id"), "privacy_spent", ["run_id"], unique=False
    )


def downgrade() -> None:
    """Revert this migration."""
    op.drop_index(op.f("ix_privacy_spent_run_id"), table_name="privacy_spent")
    op.drop_table("privacy_spent")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("privacy")
        batch.drop_column("stop_reason")
