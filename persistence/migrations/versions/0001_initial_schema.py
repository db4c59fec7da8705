"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 07:02:40.142188
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this migration."""
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
        sa.UniqueConstraint("name", name=op.f("uq_experiments_name")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("training_mode", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=True),
        sa.Column("partition", sa.String(length=128), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("num_rounds", sa.Integer(), nullable=True),
        sa.Column("rounds_completed", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("flwr_run_id", sa.String(length=20), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("outputs_path", sa.Text(), nullable=True),
        sa.Column("checkpoint_path", sa.Text(), nullable=True),
        sa.Column("final_model_path", sa.Text(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status = 'in_progress' OR end_time IS NOT NULL",
            name=op.f("ck_runs_end_time_set"),
        ),
        sa.CheckConstraint(
            "status IN ('in_progress', 'completed', 'failed')",
            name=op.f("ck_runs_status"),
        ),
        sa.CheckConstraint(
            "training_mode IN ('centralized', 'federated')",
            name=op.f("ck_runs_training_mode"),
        ),
        sa.CheckConstraint(
            "num_rounds IS NULL OR num_rounds >= 0",
            name=op.f("ck_runs_num_rounds_non_negative"),
        ),
        sa.CheckConstraint(
            "rounds_completed IS NULL OR rounds_completed >= 0",
            name=op.f("ck_runs_rounds_completed_non_negative"),
        ),
        sa.CheckConstraint(
            "seed IS NULL OR seed >= 0", name=op.f("ck_runs_seed_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_runs_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(
        op.f("ix_runs_experiment_id"), "runs", ["experiment_id"], unique=False
    )

    op.create_table(
        "clients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("client_identifier", sa.String(length=64), nullable=False),
        sa.Column("partition_id", sa.Integer(), nullable=True),
        sa.Column("node_id", sa.String(length=20), nullable=True),
        sa.Column("num_examples", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "num_examples IS NULL OR num_examples >= 0",
            name=op.f("ck_clients_num_examples_non_negative"),
        ),
        sa.CheckConstraint(
            "partition_id IS NULL OR partition_id >= 0",
            name=op.f("ck_clients_partition_id_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_clients_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
        sa.UniqueConstraint(
            "run_id", "client_identifier", name="uq_clients_run_client"
        ),
    )
    op.create_index(op.f("ix_clients_run_id"), "clients", ["run_id"], unique=False)

    op.create_table(
        "server_evaluations",
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
        sa.Column("eval_seconds", sa.Float(precision=53), nullable=True),
        sa.Column("evaluation_time", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "accuracy IS NULL OR (accuracy >= 0 AND accuracy <= 1)",
            name=op.f("ck_server_evaluations_accuracy_range"),
        ),
        sa.CheckConstraint(
            "auroc IS NULL OR (auroc >= 0 AND auroc <= 1)",
            name=op.f("ck_server_evaluations_auroc_range"),
        ),
        sa.CheckConstraint(
            "eval_seconds IS NULL OR eval_seconds >= 0",
            name=op.f("ck_server_evaluations_eval_seconds_non_negative"),
        ),
        sa.CheckConstraint(
            "f1_score IS NULL OR (f1_score >= 0 AND f1_score <= 1)",
            name=op.f("ck_server_evaluations_f1_score_range"),
        ),
        sa.CheckConstraint(
            "false_negatives IS NULL OR false_negatives >= 0",
            name=op.f("ck_server_evaluations_false_negatives_non_negative"),
        ),
        sa.CheckConstraint(
            "false_positives IS NULL OR false_positives >= 0",
            name=op.f("ck_server_evaluations_false_positives_non_negative"),
        ),
        sa.CheckConstraint(
            "num_samples IS NULL OR num_samples >= 0",
            name=op.f("ck_server_evaluations_num_samples_non_negative"),
        ),
        sa.CheckConstraint(
            "precision IS NULL OR (precision >= 0 AND precision <= 1)",
            name=op.f("ck_server_evaluations_precision_range"),
        ),
        sa.CheckConstraint(
            "recall IS NULL OR (recall >= 0 AND recall <= 1)",
            name=op.f("ck_server_evaluations_recall_range"),
        ),
        sa.CheckConstraint(
            "round_number IS NULL OR round_number >= 0",
            name=op.f("ck_server_evaluations_round_number_non_negative"),
        ),
        sa.CheckConstraint(
            "threshold IS NULL OR (threshold >= 0 AND threshold <= 1)",
            name=op.f("ck_server_evaluations_threshold_range"),
        ),
        sa.CheckConstraint(
            "true_negatives IS NULL OR true_negatives >= 0",
            name=op.f("ck_server_evaluations_true_negatives_non_negative"),
        ),
        sa.CheckConstraint(
            "true_positives IS NULL OR true_positives >= 0",
            name=op.f("ck_server_evaluations_true_positives_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_server_evaluations_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_server_evaluations")),
        sa.UniqueConstraint(
            "run_id", "round_number", name="uq_server_evaluations_round"
        ),
    )
    op.create_index(
        op.f("ix_server_evaluations_run_id"),
        "server_evaluations",
        ["run_id"],
        unique=False,
    )

    op.create_table(
        "run_metrics",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=True),
        sa.Column("round_number", sa.Integer(), nullable=True),
        sa.Column("metric_name", sa.String(length=128), nullable=False),
        sa.Column("metric_value", sa.Float(precision=53), nullable=True),
        sa.Column("is_nan", sa.Boolean(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("dataset_type", sa.String(length=16), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(metric_value IS NULL AND is_nan) OR (metric_value IS NOT NULL AND NOT is_nan)",
            name=op.f("ck_run_metrics_nan_flag"),
        ),
        sa.CheckConstraint(
            "round_number IS NULL OR round_number >= 0",
            name=op.f("ck_run_metrics_round_number_non_negative"),
        ),
        sa.CheckConstraint(
            "step IS NULL OR step >= 0", name=op.f("ck_run_metrics_step_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_run_metrics_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_run_metrics_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_metrics")),
    )
    op.create_index(
        op.f("ix_run_metrics_client_id"), "run_metrics", ["client_id"], unique=False
    )
    # NULL client/round are coalesced so that re-delivering a metric is a no-op.
    op.create_index(
        "uq_run_metrics_key",
        "run_metrics",
        [
            "run_id",
            sa.text("coalesce(client_id, 0)"),
            sa.text("coalesce(round_number, -1)"),
            "metric_name",
            "step",
            "dataset_type",
        ],
        unique=True,
    )


def downgrade() -> None:
    """Revert this migration."""
    op.drop_index("uq_run_metrics_key", table_name="run_metrics")
    op.drop_index(op.f("ix_run_metrics_client_id"), table_name="run_metrics")

    op.drop_table("run_metrics")
    op.drop_index(op.f("ix_server_evaluations_run_id"), table_name="server_evaluations")

    op.drop_table("server_evaluations")
    op.drop_index(op.f("ix_clients_run_id"), table_name="clients")

    op.drop_table("clients")
    op.drop_index(op.f("ix_runs_experiment_id"), table_name="runs")

    op.drop_table("runs")
    op.drop_table("experiments")
