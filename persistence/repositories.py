"""Reads and writes the apps need; each takes a session and never commits."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Insert, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from persistence.bulk_copy import COPY_MIN_ROWS, copy_metrics, csv_rows
from persistence.column_types import utcnow
from persistence.errors import RunNotFoundError
from persistence.models import (
    RUN_STATUSES,
    TRAINING_MODES,
    Base,
    Client,
    ClientEvaluation,
    ClientFailure,
    Experiment,
    PrivacySpent,
    Run,
    RunMetric,
    RunStatus,
    ServerEvaluation,
    TestEvaluation,
)

# No row id can be larger: SQLite integers (and PostgreSQL bigints) are
# signed 64-bit; a bigger Python int cannot even be bound to a query.
MAX_ID = 2**63 - 1
SERVER_EVALUATION_FIELDS = (
    "loss",
    "accuracy",
    "precision",
    "recall",
    "f1_score",
    "auroc",
    "threshold",
    "num_samples",
    "true_positives",
    "true_negatives",
    "false_positives",
    "false_negatives",
)
_COUNT_FIELDS = {
    "num_samples",
    "true_positives",
    "true_negatives",
    "false_positives",
    "false_negatives",
}


class MetricPoint(NamedTuple):
    """One metric value to store; ``round_number`` is None for centralized runs.

    A named tuple: batches hold thousands, and tuples are cheap to create.
    """

    metric_name: str
    value: float
    step: int
    dataset_type: str
    round_number: int | None = None
    timestamp: datetime | None = None


def _insert(session: Session, model: type[Base]) -> Any:
    """Return a dialect insert that supports ``on_conflict_do_nothing``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise ValueError(f"unsupported database dialect {dialect!r}")


def get_or_create_experiment(
    session: Session, *, name: str, description: str | None = None
) -> Experiment:
    """Return the experiment with this name, creating it if needed.

    Safe when two runs start at once: the insert is a no-op on conflict.
    """
    if not name or not name.strip():
        raise ValueError("experiment name must be a non-empty string")
    stmt: Insert = _insert(session, Experiment).values(
        name=name, description=description, created_at=utcnow()
    )
    session.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
    return session.execute(
        select(Experiment).where(Experiment.name == name)
    ).scalar_one()


def get_experiment(session: Session, experiment_id: int) -> Experiment | None:
    """Return an experiment by id, or None."""
    return session.get(Experiment, experiment_id)


def create_run(
    session: Session, *, experiment_id: int, training_mode: str, **fields: Any
) -> Run:
    """Insert a run in status ``in_progress`` owned by this process."""
    if training_mode not in TRAINING_MODES:
        raise ValueError(
            f"training_mode {training_mode!r} is not one of {', '.join(TRAINING_MODES)}"
        )
    run = Run(
        experiment_id=experiment_id,
        training_mode=training_mode,
        status=RunStatus.IN_PROGRESS.value,
        start_time=utcnow(),
        heartbeat_at=utcnow(),
        host=socket.gethostname(),
        pid=os.getpid(),
        **fields,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: int) -> Run | None:
    """Return a run by id, or None."""
    return session.get(Run, run_id)


def require_run(session: Session, run_id: int) -> Run:
    """Return a run by id, or raise RunNotFoundError."""
    try:
        run = session.get(Run, run_id)
    except OverflowError:
        # SQLite cannot even bind an id past 64 bits: no run can have it.
        raise RunNotFoundError(run_id) from None
    if run is None:
        raise RunNotFoundError(run_id)
    return run


def finish_run(
    session: Session, *, run_id: int, status: str, error_message: str | None = None
) -> Run:
    """Close a run as ``completed`` or ``failed`` and stamp its end time."""
    if status not in RUN_STATUSES or status == RunStatus.IN_PROGRESS:
        raise ValueError(f"a run finishes as completed or failed, not {status!r}")
    run = require_run(session, run_id)
    run.status = RunStatus(status).value
    run.end_time = utcnow()
    run.error_message = error_message
    session.flush()
    return run


def reopen_run(session: Session, *, run_id: int) -> Run:
    """Mark a run ``in_progress`` again, owned by this process (for resume)."""
    run = require_run(session, run_id)
    run.status = RunStatus.IN_PROGRESS.value
    run.end_time = None
    run.error_message = None
    run.heartbeat_at = utcnow()
    run.host = socket.gethostname()
    run.pid = os.getpid()
    session.flush()
    return run


def update_run(session: Session, *, run_id: int, **fields: Any) -> Run:
    """Set columns of a run and refresh its heartbeat."""
    run = require_run(session, run_id)
    for key, value in fields.items():
        if not hasattr(Run, key):
            raise AttributeError(f"runs has no column {key!r}")
        setattr(run, key, value)
    run.heartbeat_at = utcnow()
    session.flush()
    return run


def get_or_create_client(
    session: Session,
    *,
    run_id: int,
    client_identifier: str,
    partition_id: int | None = None,
    node_id: int | str | None = None,
    num_examples: int | None = None,
) -> Client:
    """Return the run's client with this identifier, creating it if needed.

    Safe under concurrency: the insert is a no-op on conflict.
    """
    stmt: Insert = _insert(session, Client).values(
        run_id=run_id,
        client_identifier=client_identifier,
        partition_id=partition_id,
        node_id=None if node_id is None else str(node_id),
        num_examples=num_examples,
        created_at=utcnow(),
    )
    session.execute(
        stmt.on_conflict_do_nothing(index_elements=["run_id", "client_identifier"])
    )
    client = session.execute(
        select(Client).where(
            Client.run_id == run_id, Client.client_identifier == client_identifier
        )
    ).scalar_one()
    if num_examples is not None and client.num_examples != num_examples:
        client.num_examples = num_examples
        session.flush()
    return client


def metric_rows(
    *,
    run_id: int,
    client_id: int | None,
    points: Iterable[MetricPoint],
    recorded_at: datetime,
) -> list[dict[str, Any]]:
    """Turn metric points into ``run_metrics`` rows (NaN as NULL + flag)."""
    rows = []
    for p in points:
        value = float(p.value)
        is_nan = math.isnan(value)
        rows.append(
            {
                "run_id": run_id,
                "client_id": client_id,
                "round_number": p.round_number,
                "metric_name": p.metric_name,
                "metric_value": None if is_nan else value,
                "is_nan": is_nan,
                "step": p.step,
                "dataset_type": p.dataset_type,
                "timestamp": p.timestamp or recorded_at,
            }
        )
    return rows


def add_metrics(
    session: Session,
    *,
    run_id: int,
    client_id: int | None,
    points: Sequence[MetricPoint],
    recorded_at: datetime | None = None,
) -> int:
    """Insert metric points in one transaction; return how many were new.

    Points already stored (same run, client, round, name, step and split) are
    skipped, so re-delivering a batch changes nothing. ``recorded_at`` stamps
    points without a timestamp of their own (default: now).
    """
    if not points:
        return 0
    recorded_at = recorded_at or utcnow()
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql" and len(points) >= COPY_MIN_ROWS:
        buffer = csv_rows(run_id, client_id, points, recorded_at)
        return copy_metrics(session, buffer, len(points))
    rows = metric_rows(
        run_id=run_id, client_id=client_id, points=points, recorded_at=recorded_at
    )
    stmt = _insert(session, RunMetric).on_conflict_do_nothing()
    result = session.execute(stmt.returning(RunMetric.id), rows)
    return len(result.all())


def add_server_evaluation(
    session: Session,
    *,
    run_id: int,
    round_number: int,
    metrics: Mapping[str, float],
    eval_seconds: float | None = None,
    dataset_type: str = "val",
) -> bool:
    """Store the server's evaluation of one round; return False if already stored.

    Non-finite values are stored as NULL so range checks stay meaningful.
    """
    values = _evaluation_values(metrics)
    stmt: Insert = _insert(session, ServerEvaluation).values(
        run_id=run_id,
        round_number=round_number,
        dataset_type=dataset_type,
        eval_seconds=eval_seconds,
        evaluation_time=utcnow(),
        **values,
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=["run_id", "round_number"])
    result = session.execute(stmt.returning(ServerEvaluation.id))
    return result.first() is not None


def add_client_failure(
    session: Session,
    *,
    run_id: int,
    round_number: int,
    node_id: int | str,
    reason: str,
    client_identifier: str | None = None,
) -> bool:
    """Record a client that raised in a round; return False if already recorded."""
    stmt: Insert = _insert(session, ClientFailure).values(
        run_id=run_id,
        round_number=round_number,
        node_id=str(node_id),
        client_identifier=client_identifier,
        reason=reason,
        created_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_nothing(
        index_elements=["run_id", "round_number", "node_id"]
    )
    return session.execute(stmt.returning(ClientFailure.id)).first() is not None


def _evaluation_values(metrics: Mapping[str, float]) -> dict[str, Any]:
    """The evaluation columns of a metrics mapping; non-finite values become NULL."""
    values: dict[str, Any] = {}
    for key in SERVER_EVALUATION_FIELDS:
        value = metrics.get(key)
        if value is None or not math.isfinite(float(value)):
            values[key] = None
        else:
            values[key] = int(value) if key in _COUNT_FIELDS else float(value)
    return values


def add_client_evaluation(
    session: Session,
    *,
    run_id: int,
    client_id: int,
    round_number: int,
    metrics: Mapping[str, float],
) -> bool:
    """Store one hospital's score of a round's global model; False if already stored.

    An AUROC that is undefined (the hospital's slice holds one class) is NULL,
    never 0.
    """
    stmt: Insert = _insert(session, ClientEvaluation).values(
        run_id=run_id,
        client_id=client_id,
        round_number=round_number,
        evaluation_time=utcnow(),
        **_evaluation_values(metrics),
    )
    stmt = stmt.on_conflict_do_nothing(
        index_elements=["run_id", "client_id", "round_number"]
    )
    result = session.execute(stmt.returning(ClientEvaluation.id))
    return result.first() is not None


def add_test_evaluation(
    session: Session,
    *,
    run_id: int,
    round_number: int,
    metrics: Mapping[str, float],
) -> bool:
    """Store a run's end-of-run test score; return False if it has one already."""
    stmt: Insert = _insert(session, TestEvaluation).values(
        run_id=run_id,
        round_number=round_number,
        dataset_type="test",
        evaluation_time=utcnow(),
        **_evaluation_values(metrics),
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=["run_id"])
    return session.execute(stmt.returning(TestEvaluation.id)).first() is not None


PRIVACY_FIELDS = (
    "epsilon",
    "delta",
    "releases",
    "noise_multiplier",
    "clipping_norm",
    "sampled_clients",
)


def add_privacy_spent(
    session: Session, *, run_id: int, round_number: int, spent: Mapping[str, Any]
) -> bool:
    """Store the budget spent after a round; return False if already stored."""
    stmt: Insert = _insert(session, PrivacySpent).values(
        run_id=run_id,
        round_number=round_number,
        created_at=utcnow(),
        **{key: spent.get(key) for key in PRIVACY_FIELDS},
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=["run_id", "round_number"])
    return session.execute(stmt.returning(PrivacySpent.id)).first() is not None


def delete_rounds_after(session: Session, *, run_id: int, round_number: int) -> int:
    """Delete a run's rows after a round (the unfinished tail of a run).

    The end-of-run test score goes too: the resumed run scores its own.
    """
    deleted = 0
    tables = (RunMetric, ServerEvaluation, ClientFailure, ClientEvaluation)
    for model in (*tables, PrivacySpent):
        result = session.execute(
            delete(model).where(
                model.run_id == run_id, model.round_number > round_number
            )
        )
        deleted += result.rowcount or 0
    result = session.execute(
        delete(TestEvaluation).where(TestEvaluation.run_id == run_id)
    )
    return deleted + (result.rowcount or 0)


def count_metrics(session: Session, *, run_id: int) -> int:
    """Return how many metric rows a run has."""
    return session.execute(
        select(func.count()).select_from(RunMetric).where(RunMetric.run_id == run_id)
    ).scalar_one()
