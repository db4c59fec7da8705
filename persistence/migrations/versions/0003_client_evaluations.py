"""client evaluations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNIT_INTERVAL = ("accuracy", "precision", "recall", "f1_score", "auroc", "threshold")
NON_NEGATIVE = (
    "round_number",
    "num_samples",
    "true_positives",
    "true_negatives",
    "false_positives",
    "false_negatives",
)


def upgrade() -> None:
    """Apply this migration."""
    op.create_table(
        "client_evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(precision=53), nullable=True),
        sa.Column("accuracy", sa.Float(precision=53), nullable=True),
        sa.Column("precision", sa.Float(precision=53), nullable=True),
        sa.Column("recall", sa.Float(precision=53), nullable=True),
        sa.Column("f1_score", sa.Float(precision=53), nullable=True),
        sa.Column("auroc", sa.Float(precision=53), nullable=True),
        sa.Column("threshold", sa.Float(precision=53), nullable=True),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        sa.Column("true_positives", sa.Integer(), nullable=True),
        sa.Column("true_negatives", sa.Integer(), nullable=True),
        sa.Column("false_positives", sa.Integer(), nullable=True),
        sa.Column("false_negatives", sa.Integer(), nullable=True),
        sa.Column("evaluation_time", sa.DateTime(timezone=True), nullable=False),
        *(
            sa.CheckConstraint(
                f"{name} IS NULL OR ({name} >= 0 AND {name} <= 1)",
                name=op.f(f"ck_client_evaluations_{name}_range"),
            )
            for name in UNIT_INTERVAL
        ),
        *(
            sa.CheckConstraint(
                f"{name} IS NULL OR {name} >= 0",
                name=op.f(f"ck_client_evaluations_{name}_non_negative"),
            )
            for name in NON_NEGATIVE
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_client_evaluations_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_client_evaluations_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_evaluations")),
        sa.UniqueConstraint(
            "run_id", "client_id", "round_number", name="uq_client_evaluations_round"
        ),
    )
    for column in ("run_id", "client_id"):
        op.create_index(
            op.f(f"ix_client_evaluations_{column}"),
            "client_evaluations",
            [column],
            unique=False,
        )


def downgrade() -> None:
    """Revert this migration."""
    for column in ("run_id", "client_id"):
        op.drop_index(
            op.f(f"ix_client_evaluations_{column}"), table_name="client_evaluations"
        )
    op.drop_table("client_evaluations")
