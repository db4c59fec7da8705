"""test evaluations

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
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
        "test_evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("dataset_type", sa.String(length=16), nullable=False),
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
                name=op.f(f"ck_test_evaluations_{name}_range"),
            )
            for name in UNIT_INTERVAL
        ),
        *(
            sa.CheckConstraint(
                f"{name} IS NULL OR {name} >= 0",
                name=op.f(f"ck_test_evaluations_{name}_non_negative"),
            )
            for name in NON_NEGATIVE
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_test_evaluations_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_test_evaluations")),
        sa.UniqueConstraint("run_id", name="uq_test_evaluations_run"),
    )


def downgrade() -> None:
    """Revert this migration."""
    op.drop_table("test_evaluations")
