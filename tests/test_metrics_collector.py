"""MetricsCollectorCallback on real SQLite and PostgreSQL: never an orphan row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from client_app.metrics_collector import (
    MetricsCollectorCallback,
    MissingRunError,
    dataset_type_of,
)
from persistence import repositories as repo
from persistence.db import session_scope
from persistence.models import Run, RunMetric


def _count(engine: Engine, model: type) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


def _experiment(engine: Engine) -> int:
    with session_scope(engine) as s:
        return repo.get_or_create_experiment(s, name="collector").id


def _federated_run(engine: Engine) -> int:
    with session_scope(engine) as s:
        exp = repo.get_or_create_experiment(s, name="fed")
        return repo.create_run(s, experiment_id=exp.id, training_mode="federated").id


def test_existing_run_is_used_and_no_run_is_created(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    run_id = _federated_run(engine)
    collector = MetricsCollectorCallback(
        tmp_path,
        run_id=run_id,
        training_mode="federated",
        database_url=db_url,
        client_identifier="hospital-1",
        round_number=2,
    )
    with session_scope(engine) as s:
        assert collector._ensure_run_exists(s) == run_id
    collector.on_train_start()
    collector.on_epoch_end(1, {"train_loss": 0.5, "val_auroc": 0.9})
    collector.on_train_end({})
    assert _count(engine, Run) == 1
    with session_scope(engine) as s:
        rows = s.scalars(select(RunMetric)).all()
        assert {(r.run_id, r.round_number, r.step) for r in rows} == {(run_id, 2, 1)}
        assert {r.dataset_type for r in rows} == {"train", "val"}
        client = s.get(repo.Client, rows[0].client_id)
        assert client.client_identifier == "hospital-1"
        assert repo.require_run(s, run_id).status == "in_progress"  # not ours to close


def test_missing_run_id_raises_and_writes_nothing(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    collector = MetricsCollectorCallback(
        tmp_path, run_id=4242, training_mode="federated", database_url=db_url
    )
    with session_scope(engine) as s, pytest.raises(MissingRunError, match="4242"):
        collector._ensure_run_exists(s)
    with pytest.raises(MissingRunError):
        collector.on_epoch_end(1, {"train_loss": 0.5})
    assert _count(engine, Run) == 0
    assert _count(engine, RunMetric) == 0


def test_centralized_run_is_created_once_and_completed(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    experiment_id = _experiment(engine)
    collector = MetricsCollectorCallback(
        tmp_path, experiment_id=experiment_id, database_url=db_url
    )
    with session_scope(engine) as s:
        first = collector._ensure_run_exists(s)
    with session_scope(engine) as s:
        assert collector._ensure_run_exists(s) == first
        run = repo.require_run(s, first)
        assert (run.status, run.training_mode, run.end_time) == (
            "in_progress",
            "centralized",
            None,
        )
    for epoch in (1, 2):
        collector.on_epoch_end(epoch, {"train_loss": 1.0 / epoch, "val_auroc": 0.8})
    collector.on_train_end({"best_epoch": 2, "final_val_auroc": 0.8})
    assert _count(engine, Run) == 1
    with session_scope(engine) as s:
        run = repo.require_run(s, first)
        assert run.status == "completed" and run.end_time is not None
        rows = s.scalars(select(RunMetric)).all()
        assert {r.run_id for r in rows} == {first}
        assert {r.client_id for r in rows} == {None}
        assert len(rows) == 5  # 2 epochs x 2 metrics + the final summary


def test_centralized_run_is_failed_when_training_raises(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    collector = MetricsCollectorCallback(
        tmp_path, experiment_id=_experiment(engine), database_url=db_url
    )
    collector.on_train_start()
    collector.on_epoch_end(1, {"train_loss": 0.3})
    collector.on_train_error(RuntimeError("out of memory"))
    with session_scope(engine) as s:
        run = repo.require_run(s, collector.run_id)
        assert run.status == "failed"
        assert run.error_message == "RuntimeError: out of memory"
        assert repo.count_metrics(s, run_id=run.id) == 1


def test_neither_run_nor_experiment_is_a_value_error(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    collector = MetricsCollectorCallback(tmp_path, database_url=db_url)
    with (
        session_scope(engine) as s,
        pytest.raises(ValueError, match="experiment_id is required"),
    ):
        collector._ensure_run_exists(s)
    assert _count(engine, Run) == 0


def test_federated_without_run_id_is_an_error(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    collector = MetricsCollectorCallback(
        tmp_path,
        experiment_id=_experiment(engine),
        training_mode="federated",
        database_url=db_url,
    )
    with session_scope(engine) as s, pytest.raises(ValueError, match="ServerApp"):
        collector._ensure_run_exists(s)
    assert _count(engine, Run) == 0


def test_missing_experiment_creates_nothing(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    collector = MetricsCollectorCallback(
        tmp_path, experiment_id=777, database_url=db_url
    )
    with session_scope(engine) as s, pytest.raises(MissingRunError, match="777"):
        collector._ensure_run_exists(s)
    assert _count(engine, Run) == 0


def test_files_are_written_without_database(tmp_path: Path) -> None:
    collector = MetricsCollectorCallback(tmp_path, enable_db_persistence=False)
    collector.on_train_start()
    collector.on_epoch_end(1, {"train_loss": math.nan, "val_auroc": 0.75})
    collector.on_epoch_end(2, {"train_loss": 0.4, "val_auroc": 0.8})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["epoch"], r["metric_name"]) for r in rows][:2] == [
        (1, "train_loss"),
        (1, "val_auroc"),
    ]
    assert rows[0]["value"] == "nan"
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "round,epoch,metric_name,value,dataset_type"
    assert len(lines) == 5


def test_epoch_is_written_in_one_batch(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    collector = MetricsCollectorCallback(
        tmp_path, experiment_id=_experiment(engine), database_url=db_url
    )
    collector.on_epoch_end(1, {f"val_m{i}": float(i) for i in range(50)})
    with session_scope(engine) as s:
        stamps = s.scalars(select(RunMetric.timestamp)).all()
    assert len(stamps) == 50 and len(set(stamps)) == 1  # one statement, one batch
    assert not list((tmp_path / "spool").glob("*.json"))  # spool drained


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("train_loss", "train"),
        ("val_auroc", "val"),
        ("final_test_auroc", "test"),
        ("lr", "other"),
    ],
)
def test_dataset_type_of(name: str, split: str) -> None:
    assert dataset_type_of(name) == split
