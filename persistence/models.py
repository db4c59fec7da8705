"""Typed SQLAlchemy 2.x models of the tracking schema.

Table and column names are public: reports and users query them with plain SQL.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from persistence.column_types import (
    BigId,
    UTCDateTime,
    in_values,
    non_negative,
    unit_interval,
    utcnow,
)

TRAINING_MODES = ("centralized", "federated")


class RunStatus(StrEnum):
    """Where a run stands; the ``runs.status`` column holds the value."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


RUN_STATUSES = tuple(s.value for s in RunStatus)

# Named constraints make migrations reproducible across SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base holding the schema's metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Experiment(Base):
    """A named group of runs that answer one question."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[Run]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"Experiment(id={self.id}, name={self.name!r})"


class Run(Base):
    """One training session: a centralized baseline or one federated simulation."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(
            in_values("training_mode", TRAINING_MODES), name="training_mode"
        ),
        CheckConstraint(in_values("status", RUN_STATUSES), name="status"),
        CheckConstraint(
            "status = 'in_progress' OR end_time IS NOT NULL", name="end_time_set"
        ),
        *non_negative("rounds_completed", "num_rounds", "seed"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    training_mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.IN_PROGRESS.value)
    start_time: Mapped[datetime] = mapped_column(default=utcnow)
    end_time: Mapped[datetime | None]
    # Reproduce and audit: what ran, how, and where its artefacts are.
    strategy: Mapped[str | None] = mapped_column(String(64))
    partition: Mapped[str | None] = mapped_column(String(128))
    seed: Mapped[int | None] = mapped_column(Integer)
    num_rounds: Mapped[int | None] = mapped_column(Integer)
    rounds_completed: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict[str, Any] | None]
    # Flower's run id is a random uint64, wider than BIGINT: stored as text.
    flwr_run_id: Mapped[str | None] = mapped_column(String(20))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Why a completed run stopped before num_rounds (its privacy budget).
    stop_reason: Mapped[str | None] = mapped_column(Text)
    # Differential privacy mode of a federated run (privacy.mode), NULL = none.
    privacy: Mapped[str | None] = mapped_column(String(32))
    outputs_path: Mapped[str | None] = mapped_column(Text)
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    final_model_path: Mapped[str | None] = mapped_column(Text)
    # Liveness of the process that owns an in-progress run.
    heartbeat_at: Mapped[datetime | None]
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)

    experiment: Mapped[Experiment] = relationship(back_populates="runs")

    def __repr__(self) -> str:
        return f"Run(id={self.id}, mode={self.training_mode!r}, status={self.status!r})"


class Client(Base):
    """A participant of a federated run, such as one simulated hospital."""

    __tablename__ = "clients"
    __table_args__ = (
        UniqueConstraint("run_id", "client_identifier", name="uq_clients_run_client"),
        *non_negative("partition_id", "num_examples"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    client_identifier: Mapped[str] = mapped_column(String(64))
    partition_id: Mapped[int | None] = mapped_column(Integer)
    # Flower's node id is a random uint64, wider than BIGINT: stored as text.
    node_id: Mapped[str | None] = mapped_column(String(20))
    num_examples: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Client(id={self.id}, run_id={self.run_id}, {self.client_identifier!r})"


class RunMetric(Base):
    """One metric value of a run at one step.

    ``client_id`` and ``round_number`` are NULL for centralized runs; a row with
    a round and no client is the server's aggregate over that round's clients.
    NaN is stored as ``metric_value`` NULL with ``is_nan`` true, because SQLite
    cannot store NaN.
    """

    __tablename__ = "run_metrics"
    __table_args__ = (
        CheckConstraint(
            "(metric_value IS NULL AND is_nan) OR "
            "(metric_value IS NOT NULL AND NOT is_nan)",
            name="nan_flag",
        ),
        *non_negative("round_number", "step"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Looked up through uq_run_metrics_key, whose first column is run_id.
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    client_id: Mapped[int | None] = mapped_column(
        ForeignKey("clients.id", ondelete="CASCADE"), index=True
    )
    round_number: Mapped[int | None] = mapped_column(Integer)
    metric_name: Mapped[str] = mapped_column(String(128))
    metric_value: Mapped[float | None] = mapped_column(Float(53))
    is_nan: Mapped[bool] = mapped_column(Boolean, default=False)
    step: Mapped[int] = mapped_column(Integer, default=0)
    dataset_type: Mapped[str] = mapped_column(String(16))
    timestamp: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return (
            f"RunMetric(run_id={self.run_id}, client_id={self.client_id}, "
            f"round={self.round_number}, {self.metric_name}={self.metric_value})"
        )


# Unique keys treat NULLs as distinct, and centralized rows have no client and
# no round: the key coalesces them so that re-delivering a metric is a no-op.
Index(
    "uq_run_metrics_key",
    RunMetric.run_id,
    func.coalesce(RunMetric.client_id, 0),
    func.coalesce(RunMetric.round_number, -1),
    RunMetric.metric_name,
    RunMetric.step,
    RunMetric.dataset_type,
    unique=True,
)


class EvaluationScores:
    """The scores every evaluation of a model stores (a mixin of two tables)."""

    @staticmethod
    def checks(*non_negative_extra: str) -> list[CheckConstraint]:
        """Return the range CHECKs of the score columns (and of the extra ones)."""
        return [
            *unit_interval("accuracy", "precision", "recall", "f1_score", "auroc"),
            *unit_interval("threshold"),
            *non_negative(
                "round_number",
                "num_samples",
                *non_negative_extra,
                "true_positives",
                "true_negatives",
                "false_positives",
                "false_negatives",
            ),
        ]

    loss: Mapped[float | None] = mapped_column(Float(53))
    accuracy: Mapped[float | None] = mapped_column(Float(53))
    precision: Mapped[float | None] = mapped_column(Float(53))
    recall: Mapped[float | None] = mapped_column(Float(53))
    f1_score: Mapped[float | None] = mapped_column(Float(53))
    auroc: Mapped[float | None] = mapped_column(Float(53))
    threshold: Mapped[float | None] = mapped_column(Float(53))
    num_samples: Mapped[int | None] = mapped_column(Integer)
    true_positives: Mapped[int | None] = mapped_column(Integer)
    true_negatives: Mapped[int | None] = mapped_column(Integer)
    false_positives: Mapped[int | None] = mapped_column(Integer)
    false_negatives: Mapped[int | None] = mapped_column(Integer)


class ServerEvaluation(EvaluationScores, Base):
    """The global model evaluated by the server on the validation split."""

    __tablename__ = "server_evaluations"
    __table_args__ = (
        UniqueConstraint("run_id", "round_number", name="uq_server_evaluations_round"),
        *EvaluationScores.checks("eval_seconds"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    round_number: Mapped[int] = mapped_column(Integer)
    dataset_type: Mapped[str] = mapped_column(String(16), default="val")
    eval_seconds: Mapped[float | None] = mapped_column(Float(53))
    evaluation_time: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return (
            f"ServerEvaluation(run_id={self.run_id}, round={self.round_number}, "
            f"auroc={self.auroc})"
        )


class ClientFailure(Base):
    """A client that raised in a round instead of replying."""

    __tablename__ = "client_failures"
    __table_args__ = (
        UniqueConstraint(
            "run_id", "round_number", "node_id", name="uq_client_failures_round_node"
        ),
        *non_negative("round_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    round_number: Mapped[int] = mapped_column(Integer)
    # Flower's node id is a random uint64, wider than BIGINT: stored as text.
    node_id: Mapped[str] = mapped_column(String(20))
    client_identifier: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return (
            f"ClientFailure(run_id={self.run_id}, round={self.round_number}, "
            f"node={self.node_id})"
        )


class ClientEvaluation(EvaluationScores, Base):
    """The global model of a round scored by one hospital on its held-out slice.

    ``auroc`` is NULL when the slice holds one class only (it is undefined).
    """

    __tablename__ = "client_evaluations"
    __table_args__ = (
        UniqueConstraint(
            "run_id", "client_id", "round_number", name="uq_client_evaluations_round"
        ),
        *EvaluationScores.checks(),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    client_id: Mapped[int] = mapped_column(
        ForeignKey("clients.id", ondelete="CASCADE"), index=True
    )
    round_number: Mapped[int] = mapped_column(Integer)
    evaluation_time: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return (
            f"ClientEvaluation(run_id={self.run_id}, client_id={self.client_id}, "
            f"round={self.round_number})"
        )


class TestEvaluation(EvaluationScores, Base):
    """The end-of-run score of a run's kept model on the test split, once per run.

    Never used to select anything: the model is the best by val AUROC (its
    round or epoch is ``round_number``) and the threshold is its val threshold.
    """

    __tablename__ = "test_evaluations"
    __table_args__ = (
        UniqueConstraint("run_id", name="uq_test_evaluations_run"),
        *EvaluationScores.checks(),
    )
    # Not a test class, whatever pytest's collector thinks of the name.
    __test__ = False

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_number: Mapped[int] = mapped_column(Integer)
    dataset_type: Mapped[str] = mapped_column(String(16), default="test")
    evaluation_time: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return (
            f"TestEvaluation(run_id={self.run_id}, round={self.round_number}, "
            f"auroc={self.auroc})"
        )


class PrivacySpent(Base):
    """The privacy budget a run has spent after a round (client-level DP).

    Cumulative epsilon at the run's delta after the round's release, from
    Flower's RDP accountant; a round whose update was not released (skipped)
    has no row.
    """

    __tablename__ = "privacy_spent"
    __table_args__ = (
        UniqueConstraint("run_id", "round_number", name="uq_privacy_spent_round"),
        CheckConstraint("epsilon >= 0", name="epsilon_non_negative"),
        CheckConstraint("delta > 0 AND delta < 1", name="delta_range"),
        *non_negative("round_number", "releases"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    round_number: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float] = mapped_column(Float(53))
    delta: Mapped[float] = mapped_column(Float(53))
    # Private releases composed so far (rounds that produced a global model).
    releases: Mapped[int] = mapped_column(Integer)
    noise_multiplier: Mapped[float] = mapped_column(Float(53))
    # The fixed modes' clipping norm; NULL for the adaptive modes, whose norm
    # moves every round (the current one is in the round checkpoint).
    clipping_norm: Mapped[float | None] = mapped_column(Float(53))
    sampled_clients: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return (
            f"PrivacySpent(run_id={self.run_id}, round={self.round_number}, "
            f"epsilon={self.epsilon})"
        )
