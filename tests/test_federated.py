"""Federated simulations through real `flwr run`, on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text, true
from sqlalchemy.engine import make_url

from persistence.db import dispose_engines, get_engine, session_scope
from persistence.models import (
    Client,
    ClientEvaluation,
    PrivacySpent,
    Run,
    RunMetric,
    ServerEvaluation,
    TestEvaluation,
)
from tests.conftest import REPO_ROOT, make_db_url, run_cli
from tests.faults import fault_app
from tests.test_privacy import expected_epsilons

# Every test here starts Flower or trains: the e2e tier.
pytestmark = pytest.mark.e2e

# Each epoch of each client reports these metrics (see the trainer).
PER_EPOCH = 15
SMALL = ("data.limit=300", "model.width=8", "simulation.num_supernodes=3")


def small_run(data_file: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Arguments of a quick 3-client simulation on a few hundred images."""
    return [
        "run",
        f"data.path={data_file}",
        *SMALL,
        "num_rounds=2",
        f"outputs_dir={tmp_path / 'out'}",
        *extra,
    ]


def assert_complete_run(
    engine: Engine,
    clients: int,
    rounds: int,
    run_id: int | None = None,
    *,
    test_split: bool = False,
    private: bool = False,
) -> int:
    """Assert the rows one completed federated run must have; return its id.

    Without ``run_id`` the database must hold exactly this one run; with it
    (a sweep), the checks are about that run's rows. ``test_split``: the
    data has one, so the run must have its end-of-run test score.
    """
    with session_scope(engine) as s:
        if run_id is None:
            runs = s.scalars(select(Run)).all()
            assert len(runs) == 1
            run = runs[0]
        else:
            run = s.get_one(Run, run_id)
        assert (run.training_mode, run.status) == ("federated", "completed")
        assert run.end_time is not None and run.rounds_completed == rounds
        assert int(run.flwr_run_id) > 0
        assert Path(run.checkpoint_path).is_file()
        assert Path(run.final_model_path).is_file()
        of_run = RunMetric.run_id == run.id if run_id is not None else true()
        client_rows = s.scalars(
            select(Client).where(Client.run_id == run.id if run_id else true())
        ).all()
        assert len(client_rows) == clients
        assert {c.run_id for c in client_rows} == {run.id}
        per_client = s.execute(
            select(RunMetric.client_id, RunMetric.round_number, func.count())
            .where(RunMetric.client_id.is_not(None), of_run)
            .group_by(RunMetric.client_id, RunMetric.round_number)
        ).all()
        expected = {(c.id, r) for c in client_rows for r in range(1, rounds + 1)}
        assert {(c, r) for c, r, _ in per_client} == expected
        assert {n for _, _, n in per_client} == {PER_EPOCH}
        # No row of this run's clients is filed under another run.
        ids = [c.id for c in client_rows]
        strays = RunMetric.run_id != run.id
        if run_id is not None:
            strays = strays & RunMetric.client_id.in_(ids)
        assert s.scalar(select(func.count()).where(strays)) == 0
        aggregates = s.scalars(
            select(RunMetric.round_number).where(RunMetric.client_id.is_(None), of_run)
        ).all()
        assert set(aggregates) == set(range(1, rounds + 1))
        evals = s.scalars(
            select(ServerEvaluation.round_number).where(
                ServerEvaluation.run_id == run.id
            )
        ).all()
        assert sorted(evals) == list(range(rounds + 1))
        # Every hospital scored every round's global model, under this run.
        hospital = s.execute(
            select(
                ClientEvaluation.client_id,
                ClientEvaluation.round_number,
                ClientEvaluation.run_id,
            ).where(ClientEvaluation.client_id.in_(ids))
        ).all()
        assert len(hospital) == clients * rounds
        assert {(c, r) for c, r, _ in hospital} == expected
        assert {r for _, _, r in hospital} == {run.id}
        tests = s.scalars(
            select(TestEvaluation).where(TestEvaluation.run_id == run.id)
        ).all()
        assert len(tests) == int(test_split)
        # Private runs: Flower's accountant's epsilon after every round.
        spent = s.scalars(
            select(PrivacySpent)
            .where(PrivacySpent.run_id == run.id)
            .order_by(PrivacySpent.round_number)
        ).all()
        if private:
            assert [p.round_number for p in spent] == list(range(1, rounds + 1))
            delta = run.config["privacy"]["delta"]
            want = expected_epsilons(1.0, clients, clients, delta, rounds)
            assert [p.epsilon for p in spent] == pytest.approx(want, rel=1e-9)
            assert all(0 < a < b for a, b in zip(want, want[1:], strict=False))
        else:
            assert spent == []
        if engine.dialect.name == "sqlite":
            assert s.execute(text("PRAGMA foreign_key_check")).all() == []
        return run.id


@dataclass
class Session:
    """One finished `fedpneumo run`, shared by the tests that inspect it."""

    result: subprocess.CompletedProcess[str]
    url: str
    out: Path


# Every strategy runs a whole session in-process in tests/test_sessions.py; the
# SQLite session sweeps two through `flwr run` and Ray: one that changes the
# clients' loss (FedProx's proximal term) and one with server state (FedAdam).
SWEPT = ("fedprox", "fedadam")


def run_session(
    backend: str, request: pytest.FixtureRequest, data_file: Path, *extra: str
) -> Iterator[Session]:
    # data_file: the PostgreSQL session's has a test split, SQLite's has none.
    """Run 3-client, 2-round sessions on a fresh database of a backend."""
    tmp = request.getfixturevalue("tmp_path_factory").mktemp(f"session-{backend}")
    url = make_db_url(backend, request, tmp)
    # SQLite as an override (the ServerApp must write to the file the CLI
    # checked), PostgreSQL as deployments give it: DATABASE_URL.
    if backend == "sqlite":
        result = run_cli(*small_run(data_file, tmp, *extra, f"db.url={url}"))
    else:
        result = run_cli(*small_run(data_file, tmp, *extra), env={"DATABASE_URL": url})
    yield Session(result, url, tmp / "out")
    dispose_engines()


@pytest.fixture(scope="module")
def sqlite_session(
    request: pytest.FixtureRequest, data_file: Path
) -> Iterator[Session]:
    """The shared sessions on SQLite: a sweep, one run per swept strategy."""
    yield from run_session(
        "sqlite", request, data_file, "-m", "strategy=" + ",".join(SWEPT)
    )


@pytest.fixture(scope="module")
def postgres_session(
    request: pytest.FixtureRequest, data_with_test: Path
) -> Iterator[Session]:
    """The shared session on PostgreSQL (one run; the URL holds a password).

    Its data has a test split, so the run ends with a test score; it is
    differentially private (server-side clipping), for three rounds.
    """
    yield from run_session(
        "postgres", request, data_with_test, "privacy=server_fixed", "num_rounds=3"
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_federated_run_tracks_every_client_and_round(
    backend: str, request: pytest.FixtureRequest
) -> None:
    session: Session = request.getfixturevalue(f"{backend}_session")
    result = session.result
    assert result.returncode == 0, result.stderr[-3000:]
    assert "federated run" in result.stdout and "completed" in result.stdout
    engine = get_engine(session.url)
    if backend == "postgres":
        assert "round 3/3" in result.stderr  # progress lines off a terminal
        assert_complete_run(engine, clients=3, rounds=3, test_split=True, private=True)
        assert "privacy: server_fixed, final epsilon " in result.stdout
        assert "test (scored once after training, never used for selection" in (
            result.stdout
        )
        return
    assert "round 2/2" in result.stderr
    assert "worst hospital (round" in result.stdout
    assert "nothing is claimed about test" in result.stdout
    with session_scope(engine) as s:
        run_ids = s.scalars(select(Run.id)).all()
    assert len(run_ids) == len(SWEPT)  # one Run per session of the sweep
    for run_id in run_ids:
        assert_complete_run(engine, clients=3, rounds=2, run_id=run_id)


def test_failing_server_app_marks_the_run_failed(
    tmp_path: Path, data_file: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'out' / 'fedpneumo.db'}"
    app = fault_app(tmp_path, server_round=1)
    args = small_run(data_file, tmp_path)
    result = run_cli(args[0], "--app", str(app), *args[1:])
    assert result.returncode == 1
    assert "injected server fault in round 1" in result.stderr
    with session_scope(get_engine(db)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed" and run.end_time is not None
        assert run.error_message == "RuntimeError: injected server fault in round 1"


def test_strategy_sweep_completes_through_flower(sqlite_session: Session) -> None:
    result = sqlite_session.result
    assert result.returncode == 0, result.stderr[-3000:]
    with session_scope(get_engine(sqlite_session.url)) as s:
        runs = s.scalars(select(Run)).all()
        assert sorted(r.strategy for r in runs) == sorted(SWEPT)
        assert {r.status for r in runs} == {"completed"}
        assert {r.experiment_id for r in runs} == {runs[0].experiment_id}
        for run in runs:
            rounds = s.scalars(
                select(ServerEvaluation.round_number).where(
                    ServerEvaluation.run_id == run.id
                )
            ).all()
            assert sorted(rounds) == [0, 1, 2], run.strategy


def test_bad_override_stops_before_anything_starts(tmp_path: Path) -> None:
    result = run_cli("run", "partition.alpha=0", f"outputs_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: partition.alpha=0.0 is invalid; it must be > 0"
    ]
    assert not (tmp_path / "fedpneumo.db").exists()


def test_config_snapshot_has_no_password(postgres_session: Session) -> None:
    session = postgres_session
    password = make_url(session.url).password
    assert password and session.result.returncode == 0
    assert password not in session.result.stdout + session.result.stderr
    with session_scope(get_engine(session.url)) as s:
        run = s.scalars(select(Run)).one()
        assert password not in json.dumps(run.config)
    logs = "".join(p.read_text() for p in session.out.rglob("*.log"))
    assert logs and password not in logs


def readme_sql(title: str) -> str:
    """Return the README's SQL example whose first line is ``-- title``."""
    blocks = re.findall(
        r"```sql\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S
    )
    (block,) = [b for b in blocks if b.startswith(f"-- {title}")]
    return block


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_readme_sql_finds_the_worst_hospital_of_each_run(
    backend: str, request: pytest.FixtureRequest
) -> None:
    session: Session = request.getfixturevalue(f"{backend}_session")
    query = readme_sql("the worst hospital of each run")
    with session_scope(get_engine(session.url)) as s:
        found = s.execute(text(query)).all()
        expected = []
        for run_id in s.scalars(select(Run.id).order_by(Run.id)):
            last = s.scalar(
                select(func.max(ClientEvaluation.round_number)).where(
                    ClientEvaluation.run_id == run_id
                )
            )
            scored = s.execute(
                select(Client.client_identifier, ClientEvaluation.auroc)
                .join(Client, ClientEvaluation.client_id == Client.id)
                .where(
                    ClientEvaluation.run_id == run_id,
                    ClientEvaluation.round_number == last,
                    ClientEvaluation.auroc.is_not(None),
                )
            ).all()
            worst = min(scored, key=lambda r: (r[1], r[0]))
            expected.append((run_id, *worst))
    assert [(r.run_id, r.worst_hospital, r.auroc) for r in found] == expected
