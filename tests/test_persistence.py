"""The tracking schema and repositories on a real SQLite file and real PostgreSQL."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError

from persistence import repositories as repo
from persistence.db import (
    DatabaseError,
    backend_of,
    describe_error,
    get_engine,
    head_revision,
    mask_url,
    session_scope,
    table_names,
    upgrade_database,
)
from persistence.entries import (
    ClientEvaluationRound,
    HospitalScore,
    apply_entry,
    check_entry,
    score_on_test_entry,
)
from persistence.models import (
    Base,
    Client,
    ClientEvaluation,
    Run,
    RunMetric,
    ServerEvaluation,
    TestEvaluation,
    utcnow,
)
from persistence.repositories import MetricPoint

TABLES = [
    "client_failures",
    "clients",
    "experiments",
    "run_metrics",
    "runs",
    "server_evaluations",
]
UINT64_MAX = 2**64 - 1


def _new_run(engine: Engine, mode: str = "centralized") -> int:
    with session_scope(engine) as s:
        exp = repo.get_or_create_experiment(s, name="exp")
        return repo.create_run(s, experiment_id=exp.id, training_mode=mode).id


def test_upgrade_creates_all_tables_and_is_idempotent(empty_db_url: str) -> None:
    before, after = upgrade_database(empty_db_url)
    assert before is None and after == head_revision()
    engine = get_engine(empty_db_url)
    assert set(TABLES) <= set(table_names(engine))
    assert upgrade_database(empty_db_url) == (head_revision(), head_revision())


def test_migrations_match_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_orphan_metric_is_rejected(engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(
            RunMetric(
                run_id=424242,
                metric_name="train_loss",
                metric_value=0.5,
                is_nan=False,
                step=1,
                dataset_type="train",
                timestamp=utcnow(),
            )
        )
    with session_scope(engine) as s:
        assert s.scalar(select(RunMetric.id)) is None


def test_run_without_experiment_is_rejected(engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(Run(experiment_id=987654, training_mode="centralized"))


@pytest.mark.parametrize(
    ("column", "value"),
    [("status", "running"), ("training_mode", "decentralized")],
)
def test_invalid_enum_values_are_rejected(
    engine: Engine, column: str, value: str
) -> None:
    run_id = _new_run(engine)
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.execute(
            text(f"UPDATE runs SET {column} = :v WHERE id = :id"),
            {"v": value, "id": run_id},
        )


def test_value_ranges_are_enforced(engine: Engine) -> None:
    run_id = _new_run(engine)
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(ServerEvaluation(run_id=run_id, round_number=0, accuracy=1.5))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(ServerEvaluation(run_id=run_id, round_number=-1, accuracy=0.5))


def test_same_metric_twice_leaves_one_row(engine: Engine) -> None:
    run_id = _new_run(engine, mode="federated")
    centralized = [MetricPoint("train_loss", 0.7, step=1, dataset_type="train")]
    per_client = [
        MetricPoint("train_loss", 0.6, step=1, dataset_type="train", round_number=1)
    ]
    for _ in range(2):
        with session_scope(engine) as s:
            client = repo.get_or_create_client(
                s, run_id=run_id, client_identifier="hospital-0", partition_id=0
            )
            repo.add_metrics(s, run_id=run_id, client_id=None, points=centralized)
            repo.add_metrics(s, run_id=run_id, client_id=client.id, points=per_client)
    with session_scope(engine) as s:
        rows = s.scalars(select(RunMetric).order_by(RunMetric.id)).all()
        assert [(r.client_id is None, r.round_number) for r in rows] == [
            (True, None),
            (False, 1),
        ]
        assert repo.count_metrics(s, run_id=run_id) == 2


def test_add_metrics_reports_new_rows_only(engine: Engine) -> None:
    run_id = _new_run(engine)
    points = [
        MetricPoint("val_auroc", 0.9, step=i, dataset_type="val") for i in range(5)
    ]
    with session_scope(engine) as s:
        assert repo.add_metrics(s, run_id=run_id, client_id=None, points=points) == 5
    with session_scope(engine) as s:
        more = [*points, MetricPoint("val_auroc", 0.95, step=5, dataset_type="val")]
        assert repo.add_metrics(s, run_id=run_id, client_id=None, points=more) == 1


def test_non_finite_values_round_trip(engine: Engine) -> None:
    run_id = _new_run(engine)
    values = [math.nan, math.inf, -math.inf, 0.25]
    points = [
        MetricPoint("train_loss", v, step=i, dataset_type="train")
        for i, v in enumerate(values)
    ]
    with session_scope(engine) as s:
        repo.add_metrics(s, run_id=run_id, client_id=None, points=points)
    with session_scope(engine) as s:
        rows = s.scalars(select(RunMetric).order_by(RunMetric.step)).all()
    got = [math.nan if r.is_nan else r.metric_value for r in rows]
    assert math.isnan(got[0]) and got[1:] == [math.inf, -math.inf, 0.25]


def test_server_evaluation_is_written_once(engine: Engine) -> None:
    run_id = _new_run(engine, mode="federated")
    metrics = {"loss": math.nan, "accuracy": 0.8, "auroc": 0.9, "num_samples": 10}
    with session_scope(engine) as s:
        assert repo.add_server_evaluation(
            s, run_id=run_id, round_number=0, metrics=metrics
        )
        assert not repo.add_server_evaluation(
            s, run_id=run_id, round_number=0, metrics=metrics
        )
    with session_scope(engine) as s:
        ev = s.scalars(select(ServerEvaluation)).one()
    assert (ev.loss, ev.accuracy, ev.num_samples) == (None, 0.8, 10)


def test_flower_ids_are_stored_as_text(engine: Engine) -> None:
    run_id = _new_run(engine, mode="federated")
    with session_scope(engine) as s:
        repo.update_run(s, run_id=run_id, flwr_run_id=str(UINT64_MAX))
        client = repo.get_or_create_client(
            s, run_id=run_id, client_identifier="n", node_id=UINT64_MAX
        )
        client_id = client.id
    with session_scope(engine) as s:
        assert int(repo.require_run(s, run_id).flwr_run_id) == UINT64_MAX
        assert s.get(repo.Client, client_id).node_id == str(UINT64_MAX)


def test_finish_run_and_missing_run(engine: Engine) -> None:
    run_id = _new_run(engine)
    with session_scope(engine) as s:
        run = repo.finish_run(s, run_id=run_id, status="failed", error_message="boom")
        assert run.end_time is not None and run.end_time >= run.start_time
    with (
        session_scope(engine) as s,
        pytest.raises(repo.RunNotFoundError, match="run 999"),
    ):
        repo.finish_run(s, run_id=999, status="completed")


def test_cascade_delete(engine: Engine) -> None:
    run_id = _new_run(engine)
    with session_scope(engine) as s:
        repo.add_metrics(
            s,
            run_id=run_id,
            client_id=None,
            points=[MetricPoint("train_loss", 1.0, step=1, dataset_type="train")],
        )
    with session_scope(engine) as s:
        s.execute(text("DELETE FROM experiments"))
    with session_scope(engine) as s:
        assert s.scalar(select(RunMetric.id)) is None


def test_concurrent_get_or_create(engine: Engine) -> None:
    run_id = _new_run(engine, mode="federated")

    def work(i: int) -> tuple[int, int]:
        with session_scope(engine) as s:
            exp = repo.get_or_create_experiment(s, name="shared")
            client = repo.get_or_create_client(
                s, run_id=run_id, client_identifier=f"c{i % 2}"
            )
            return exp.id, client.id

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(work, range(12)))
    assert len({e for e, _ in results}) == 1
    assert len({c for _, c in results}) == 2


def test_unknown_schema_revision_is_reported(db_url: str) -> None:
    engine = get_engine(db_url)
    with session_scope(engine) as s:
        s.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    with pytest.raises(DatabaseError, match="schema migration 'ffff9999'"):
        upgrade_database(db_url)


def test_url_helpers_hide_passwords() -> None:
    url = "postgresql://alice:s3cret@db.example:5432/tracking"
    assert "s3cret" not in mask_url(url) and "***" in mask_url(url)
    assert backend_of(url) == "postgresql"
    with pytest.raises(DatabaseError, match="not supported"):
        backend_of("mysql://u:p@h/db")

    class Fake(Exception):
        pass

    message = describe_error(Fake('password authentication failed for "s3cret"'), url)
    assert "s3cret" not in message and "wrong user name or password" in message


def test_unreachable_and_wrong_password_postgres(pg_server) -> None:  # noqa: ANN001
    wrong = pg_server.url(password="not-the-password")
    with pytest.raises(DatabaseError, match="wrong user name or password") as err:
        upgrade_database(wrong)
    assert "not-the-password" not in str(err.value)
    down = "postgresql+psycopg2://u:hunter2@127.0.0.1:1/db"
    with pytest.raises(DatabaseError, match="unreachable") as err:
        upgrade_database(down)
    assert "hunter2" not in str(err.value)


def test_large_batches_round_trip_and_stay_idempotent(engine: Engine) -> None:
    """Large batches take PostgreSQL's COPY path; the result must be identical."""
    run_id = _new_run(engine, mode="federated")
    values = [math.nan, math.inf, -math.inf, 1e-300, 0.1]
    points = [
        MetricPoint(
            f'val_m{i},"quoted"',
            values[i % len(values)],
            step=i,
            dataset_type="val",
            round_number=None if i % 2 else 3,
        )
        for i in range(repo.COPY_MIN_ROWS + 50)
    ]
    with session_scope(engine) as s:
        client = repo.get_or_create_client(s, run_id=run_id, client_identifier="c")
        assert repo.add_metrics(
            s, run_id=run_id, client_id=client.id, points=points
        ) == len(points)
        assert (
            repo.add_metrics(s, run_id=run_id, client_id=client.id, points=points) == 0
        )
    with session_scope(engine) as s:
        rows = s.scalars(select(RunMetric).order_by(RunMetric.step)).all()
    assert len(rows) == len(points)
    for row, point in zip(rows, points, strict=True):
        assert (row.metric_name, row.round_number, row.step) == (
            point.metric_name,
            point.round_number,
            point.step,
        )
        if math.isnan(point.value):
            assert row.is_nan and row.metric_value is None
        else:
            assert row.metric_value == point.value and not row.is_nan


def test_large_orphan_batch_is_rejected(engine: Engine) -> None:
    points = [
        MetricPoint("train_loss", 0.1, step=i, dataset_type="train")
        for i in range(repo.COPY_MIN_ROWS)
    ]
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        repo.add_metrics(s, run_id=987654, client_id=None, points=points)
    with session_scope(engine) as s:
        assert s.scalar(select(RunMetric.id)) is None


def test_client_evaluations_are_written_once_and_follow_their_run(
    engine: Engine,
) -> None:
    run_id = _new_run(engine, mode="federated")
    one_class = {"loss": 0.4, "accuracy": 0.9, "auroc": math.nan, "num_samples": 7}
    with session_scope(engine) as s:
        client = repo.get_or_create_client(s, run_id=run_id, client_identifier="h-0")
        for round_number in (1, 2):
            assert repo.add_client_evaluation(
                s,
                run_id=run_id,
                client_id=client.id,
                round_number=round_number,
                metrics=one_class,
            )
        assert not repo.add_client_evaluation(  # a replay stores nothing
            s, run_id=run_id, client_id=client.id, round_number=1, metrics=one_class
        )
    with session_scope(engine) as s:
        rows = s.scalars(select(ClientEvaluation)).all()
        # A one-class slice has no AUROC: NULL, never 0.
        assert [(r.round_number, r.auroc, r.num_samples) for r in rows] == [
            (1, None, 7),
            (2, None, 7),
        ]
        repo.delete_rounds_after(s, run_id=run_id, round_number=1)
    with session_scope(engine) as s:
        assert s.scalars(select(ClientEvaluation.round_number)).all() == [1]
        s.execute(text("DELETE FROM experiments"))
    with session_scope(engine) as s:
        assert s.scalar(select(ClientEvaluation.id)) is None
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        repo.add_client_evaluation(  # no such run or client
            s, run_id=run_id, client_id=999, round_number=1, metrics=one_class
        )


def test_evaluation_entries_replay_once_and_a_resume_drops_the_test_score(
    engine: Engine,
) -> None:
    run_id = _new_run(engine, mode="federated")
    hospitals = ClientEvaluationRound(
        run_id,
        2,
        [
            HospitalScore("client-0", {"auroc": 0.8, "accuracy": 0.7}, 0, "11", 90),
            HospitalScore(
                "client-1", {"auroc": math.nan, "accuracy": 1.0}, 1, "12", 40
            ),
        ],
    ).to_entry()
    test = score_on_test_entry(run_id, 2, {"auroc": 0.9, "threshold": 0.4})
    for entry in (hospitals, test):
        check_entry(json.loads(json.dumps(entry)))  # what sync reads back
    with session_scope(engine) as s:
        assert apply_entry(s, hospitals) == 2
        assert apply_entry(s, test) == 1
    with session_scope(engine) as s:  # a replay stores nothing new
        assert apply_entry(s, hospitals) == 0
        assert apply_entry(s, test) == 0
    with session_scope(engine) as s:
        rows = s.execute(
            select(
                Client.client_identifier, Client.num_examples, ClientEvaluation.auroc
            )
            .join(Client, ClientEvaluation.client_id == Client.id)
            .order_by(Client.client_identifier)
        ).all()
        assert [tuple(r) for r in rows] == [
            ("client-0", 90, 0.8),
            ("client-1", 40, None),
        ]
        stored = s.scalars(select(TestEvaluation)).one()
        assert (stored.round_number, stored.auroc, stored.threshold) == (2, 0.9, 0.4)
        # A resume from round 2 keeps round 2's hospitals, but the resumed
        # run scores test again at its own end.
        repo.delete_rounds_after(s, run_id=run_id, round_number=2)
    with session_scope(engine) as s:
        assert len(s.scalars(select(ClientEvaluation)).all()) == 2
        assert s.scalars(select(TestEvaluation)).all() == []
