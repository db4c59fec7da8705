"""The server's record of a run (server_app/recorder.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from persistence import repositories as repo
from persistence.db import get_engine, session_scope
from persistence.entries import MetricBatch
from persistence.models import (
    Client,
    ClientFailure,
    Run,
    RunMetric,
    RunStatus,
    ServerEvaluation,
)
from persistence.repositories import MetricPoint
from persistence.spool import SPOOL_DIRNAME, DurableWriter, pending_files
from server_app.recorder import RunRecorder, concise_reason
from tests.factories import federated_run


@pytest.fixture
def recorder(db_url: str, tmp_path: Path) -> RunRecorder:
    """A recorder of a fresh run, on SQLite and on PostgreSQL."""
    run_id = federated_run(db_url)
    return RunRecorder(db_url, run_id, tmp_path / "runs" / str(run_id))


@pytest.fixture
def sqlite_recorder(sqlite_url: str, tmp_path: Path) -> RunRecorder:
    run_id = federated_run(sqlite_url)
    return RunRecorder(sqlite_url, run_id, tmp_path / "runs" / str(run_id))


EVALUATION = {
    "loss": 0.52,
    "accuracy": 0.8,
    "precision": 0.75,
    "recall": 0.9,
    "f1_score": 0.82,
    "auroc": math.nan,
    "threshold": 0.44,
    "num_samples": 40.0,
    "true_positives": 18.0,
    "true_negatives": 14.0,
    "false_positives": 6.0,
    "false_negatives": 2.0,
}


def test_record_evaluation_stores_one_row_per_round(recorder: RunRecorder) -> None:
    recorder.record_evaluation(0, EVALUATION, seconds=0.25)
    recorder.record_evaluation(1, {**EVALUATION, "auroc": 0.9}, seconds=0.5)
    recorder.record_evaluation(1, {**EVALUATION, "auroc": 0.1}, seconds=0.5)  # again
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        rows = db.scalars(
            select(ServerEvaluation).order_by(ServerEvaluation.round_number)
        ).all()
        assert [(r.run_id, r.round_number) for r in rows] == [
            (recorder.run_id, 0),
            (recorder.run_id, 1),
        ]
        first, second = rows
        assert first.auroc is None  # NaN is stored as NULL
        assert second.auroc == 0.9  # a replayed round keeps its first row
        assert (first.loss, first.threshold, first.eval_seconds) == (0.52, 0.44, 0.25)
        assert (first.true_positives, first.num_samples) == (18, 40)
        assert first.dataset_type == "val"


def test_record_client_rows_creates_the_client_and_its_metrics(
    recorder: RunRecorder,
) -> None:
    points = [
        MetricPoint("train_loss", 0.7, 1, "train", 2),
        MetricPoint("val_auroc", math.nan, 1, "val", 2),
    ]
    recorder.record_client_rows(
        points,
        client_identifier="client-3",
        partition_id=3,
        node_id=18446744073709551615,  # Flower node ids use all 64 bits
        num_examples=120,
    )
    recorder.record_client_rows(
        [],
        client_identifier="client-4",
        partition_id=4,
        node_id=5,
        num_examples=10,
    )
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        clients = db.scalars(select(Client)).all()
        assert [
            (c.client_identifier, c.partition_id, c.node_id, c.num_examples)
            for c in clients
        ] == [("client-3", 3, "18446744073709551615", 120)]
        rows = db.scalars(select(RunMetric).order_by(RunMetric.metric_name)).all()
        assert [
            (r.client_id, r.round_number, r.metric_name, r.metric_value, r.is_nan)
            for r in rows
        ] == [
            (clients[0].id, 2, "train_loss", 0.7, False),
            (clients[0].id, 2, "val_auroc", None, True),
        ]


def test_record_aggregate_stores_rows_without_a_client(
    recorder: RunRecorder,
) -> None:
    # As Flower aggregates them: floats, an int, and a value that is no metric.
    metrics: dict[str, Any] = {
        "train_loss": 0.3,
        "val_auroc": math.nan,
        "val_accuracy": 1,
        "tag": "x",
    }
    recorder.record_aggregate(4, metrics)
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        rows = db.scalars(select(RunMetric).order_by(RunMetric.metric_name)).all()
        assert [
            (r.client_id, r.round_number, r.metric_name, r.metric_value, r.is_nan)
            for r in rows
        ] == [
            (None, 4, "train_loss", 0.3, False),
            (None, 4, "val_accuracy", 1.0, False),
            (None, 4, "val_auroc", None, True),
        ]
        assert {(r.step, r.dataset_type) for r in rows} == {(0, "train"), (0, "val")}


def test_record_failure_stores_the_reason_once_per_round_and_node(
    recorder: RunRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.record_failure(2, 77, "DataError: no images", "client-1")
    recorder.record_failure(2, 77, "DataError: no images", "client-1")  # replayed
    recorder.record_failure(3, 77, "MemoryError: out of memory", None)
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        rows = db.scalars(
            select(ClientFailure).order_by(ClientFailure.round_number)
        ).all()
        assert [
            (r.run_id, r.round_number, r.node_id, r.client_identifier, r.reason)
            for r in rows
        ] == [
            (recorder.run_id, 2, "77", "client-1", "DataError: no images"),
            (recorder.run_id, 3, "77", None, "MemoryError: out of memory"),
        ]
    assert "round 2: client client-1 (node 77) failed: DataError" in caplog.text


def test_update_sets_run_columns_and_the_heartbeat(recorder: RunRecorder) -> None:
    engine = get_engine(recorder.url or "")
    with session_scope(engine) as db:
        before = repo.require_run(db, recorder.run_id).heartbeat_at
    recorder.update(rounds_completed=3, checkpoint_path="/tmp/best_model.pt")
    with session_scope(engine) as db:
        run = repo.require_run(db, recorder.run_id)
        assert (run.rounds_completed, run.checkpoint_path) == (
            3,
            "/tmp/best_model.pt",
        )
        assert run.heartbeat_at is not None and before is not None
        assert run.heartbeat_at >= before
        assert run.status == RunStatus.IN_PROGRESS


def test_update_rejects_a_column_the_runs_table_lacks(
    sqlite_recorder: RunRecorder,
) -> None:
    with pytest.raises(AttributeError, match="runs has no column 'colour'"):
        sqlite_recorder.update(colour="blue")


def test_a_rejected_update_does_not_block_closing_the_run(
    sqlite_recorder: RunRecorder,
) -> None:
    with pytest.raises(IntegrityError):
        sqlite_recorder.update(rounds_completed=-1)  # the CHECK refuses it
    sqlite_recorder.update(rounds_completed=2)
    sqlite_recorder.finish(RunStatus.COMPLETED, None, timeout_s=5)
    with session_scope(get_engine(sqlite_recorder.url or "")) as db:
        run = repo.require_run(db, sqlite_recorder.run_id)
        assert (run.status, run.rounds_completed) == ("completed", 2)


@pytest.mark.parametrize(
    ("status", "error"),
    [(RunStatus.COMPLETED, None), (RunStatus.FAILED, "TooFewRepliesError: round 2")],
)
def test_finish_closes_the_run(
    sqlite_recorder: RunRecorder, status: RunStatus, error: str | None
) -> None:
    sqlite_recorder.finish(status, error, timeout_s=5)
    with session_scope(get_engine(sqlite_recorder.url or "")) as db:
        run = repo.require_run(db, sqlite_recorder.run_id)
        assert (run.status, run.error_message) == (status.value, error)
        assert run.end_time is not None


def test_writes_go_through_the_spool_and_leave_nothing_pending(
    sqlite_recorder: RunRecorder,
) -> None:
    sqlite_recorder.record_evaluation(1, EVALUATION, seconds=0.1)
    spool = sqlite_recorder.run_dir / "server" / SPOOL_DIRNAME
    assert spool.is_dir()  # written there first ...
    assert pending_files(spool) == []  # ... and removed once committed


def test_replay_all_commits_client_spools_under_the_run_folder(
    sqlite_recorder: RunRecorder,
) -> None:
    # A batch a client spooled but could not write (say, its database was down).
    client_spool = sqlite_recorder.run_dir / "clients" / "client-0" / SPOOL_DIRNAME
    batch = MetricBatch(
        run_id=sqlite_recorder.run_id,
        points=[MetricPoint("train_loss", 0.5, 1, "train", 1)],
        client_identifier="client-0",
    )
    DurableWriter(sqlite_recorder.url or "", client_spool).spool(batch.to_entry())
    assert len(pending_files(client_spool)) == 1
    assert sqlite_recorder.replay_all(timeout_s=5) == 0
    assert pending_files(client_spool) == []
    with session_scope(get_engine(sqlite_recorder.url or "")) as db:
        row = db.scalars(select(RunMetric)).one()
        client = db.scalars(select(Client)).one()
        assert (row.client_id, row.metric_name, row.round_number) == (
            client.id,
            "train_loss",
            1,
        )
        assert client.client_identifier == "client-0"


def test_a_recorder_without_a_url_records_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    run_id = federated_run(sqlite_url)
    recorder = RunRecorder(None, run_id, tmp_path / "run")
    assert not recorder.enabled
    recorder.record_evaluation(1, EVALUATION, seconds=0.1)
    recorder.record_client_rows(
        [MetricPoint("train_loss", 0.5, 1, "train", 1)],
        client_identifier="client-0",
        partition_id=0,
        node_id=1,
        num_examples=5,
    )
    recorder.record_aggregate(1, {"train_loss": 0.5})
    recorder.record_failure(1, 9, "ValueError: x", None)
    recorder.update(rounds_completed=1)
    recorder.start_heartbeat()
    assert recorder.replay_all(timeout_s=1) == 0
    recorder.finish(RunStatus.COMPLETED, None, timeout_s=1)
    assert not (tmp_path / "run").exists()
    with session_scope(get_engine(sqlite_url)) as db:
        for model in (RunMetric, ServerEvaluation, ClientFailure, Client):
            assert db.scalar(select(func.count()).select_from(model)) == 0
        run = db.get(Run, run_id)
        assert run is not None
        assert (run.status, run.rounds_completed) == ("in_progress", 0)


RAY_TRACEBACK = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
    "Exception ClientAppException occurred. Message: "
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, ip=127.0.0.1, "
    "actor_id=abc123, repr=<ClientAppActor object at 0x7f00>)\n"
    '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 59, in run\n'
    "    out_message = app(message=message, context=context)\n"
    '  File "/work/main/client_app/partition.py", line 120, in draw_partitions\n'
    "    raise DataError(\n"
    "client_app.data.DataError: simulation.num_supernodes=50 needs at least 500 "
    "training images\n"
    "\n"
    "The above exception was the direct cause of the following exception:\n"
    "\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, ip=127.0.0.1)\n"
    '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: simulation.num_supernodes=50'>"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            RAY_TRACEBACK,
            "DataError: simulation.num_supernodes=50 needs at least 500 "
            "training images",
        ),
        (
            "<class 'client_app.data.DataError'>:<'data.path '/nope' does not exist'>",
            "DataError: data.path '/nope' does not exist",
        ),
        (
            "<class 'ZeroDivisionError'>:<'division by zero'>",
            "ZeroDivisionError: division by zero",
        ),
        ("\x1b[31mValueError: boom\x1b[0m", "ValueError: boom"),
        ("KeyboardInterrupt: stopped by user", "KeyboardInterrupt: stopped by user"),
        ("the node went away\nconnection reset\n", "connection reset"),
        ("", "unknown error"),
    ],
)
def test_concise_reason(text: str, expected: str) -> None:
    assert concise_reason(text) == expected


def test_concise_reason_is_cut_at_the_limit() -> None:
    reason = concise_reason("RuntimeError: " + "x" * 1000, limit=40)
    assert reason == "RuntimeError: " + "x" * 26
