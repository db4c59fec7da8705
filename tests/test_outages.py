"""Runs that stop: a database that does not come back, a disk that fills, a
server killed mid-run. Each stops within a bound, says what to do, and its
status is the truth once the database has it; a killed run resumes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from client_app.messages import REPLY_METRICS
from fedpneumo.flower import kill_tree
from fedpneumo.reports import is_stale
from persistence.db import get_engine, session_scope
from persistence.models import (
    Client,
    ClientEvaluation,
    PrivacySpent,
    Run,
    ServerEvaluation,
)
from tests.conftest import run_cli
from tests.mounts import fill, tmpfs
from tests.pg_server import ThrowawayPostgres
from tests.test_federated import PER_EPOCH, assert_complete_run
from tests.test_privacy import expected_epsilons
from tests.test_reliability import (
    SMALL,
    counts,
    metric_keys,
    start_run,
    wait_for_round,
)

# Every test here starts Flower: the e2e tier.
pytestmark = pytest.mark.e2e


def test_postgres_down_for_good_stops_waiting_and_sync_completes_the_run(
    own_pg: ThrowawayPostgres, tmp_path: Path, data_file: Path
) -> None:
    rounds, outage_timeout_s = 3, 25
    args = [f"data.path={data_file}", "data.limit=300", *SMALL, f"num_rounds={rounds}"]
    url = own_pg.create_database("gone")
    out = tmp_path / "out"
    proc = start_run(
        [*args, f"outputs_dir={out}", f"tracking.outage_timeout_s={outage_timeout_s}"],
        {"DATABASE_URL": url},
    )
    try:
        wait_for_round(url, 1, proc)
        own_pg.stop("fast")
        stopped = time.monotonic()
        output, _ = proc.communicate(timeout=600)
        waited = time.monotonic() - stopped
    finally:
        kill_tree(proc.pid)
    # Within the outage budget plus one round (a round here takes seconds).
    assert waited < outage_timeout_s + 30, (waited, output[-3000:])
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    assert own_pg.password not in output
    assert "tracking database unreachable" in output
    command = f"fedpneumo sync --outputs {out / 'runs'}"
    error = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and command in error[0], output[-3000:]

    own_pg.start()
    with session_scope(get_engine(url)) as s:
        assert s.scalars(select(Run.status)).one() == "in_progress"
    synced = run_cli("sync", "--outputs", str(out), "--db", url)
    assert synced.returncode == 0, synced.stderr
    undisturbed = {
        "runs": 1,
        "clients": 3,
        "run_metrics": 3 * rounds * PER_EPOCH + rounds * len(REPLY_METRICS),
        "server_evaluations": rounds + 1,
        "client_failures": 0,
        "client_evaluations": 3 * rounds,
    }
    assert counts(url) == undisturbed
    assert_complete_run(get_engine(url), clients=3, rounds=rounds)
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert (run.status, run.rounds_completed) == ("completed", rounds)

    resumed = run_cli("resume", str(run.id), "--db", url)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing left to resume" in resumed.stdout
    with session_scope(get_engine(url)) as s:
        assert s.scalars(select(Run.status)).one() == "completed"
    assert counts(url) == undisturbed


def test_a_full_outputs_disk_fails_the_run_with_the_reason(
    tmp_path: Path, data_file: Path
) -> None:
    db = tmp_path / "tracking.db"
    url = f"sqlite:///{db}"
    args = [f"data.path={data_file}", "data.limit=300", *SMALL, "num_rounds=30"]
    with tmpfs(tmp_path / "out", "64m") as out:
        proc = start_run([*args, f"outputs_dir={out}", f"db.sqlite_path={db}"], {})
        try:
            wait_for_round(url, 1, proc)
            fill(out)
            output, _ = proc.communicate(timeout=300)
        finally:
            kill_tree(proc.pid)
        leftovers = [str(p) for p in out.rglob("*.tmp")]
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: federated run 1 failed: ") and (
        "No space left on device" in last
    ), output[-3000:]
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed" and 1 <= run.rounds_completed < 30
        assert "No space left on device" in run.error_message
    assert leftovers == []


def test_killed_run_resumes_in_the_same_run(
    pg_server: ThrowawayPostgres, tmp_path: Path, data_file: Path
) -> None:
    url = pg_server.create_database()
    # Killed after round 2 with 4 rounds still to go: a loaded machine can
    # poll late, and the run must not have finished by the time it is killed.
    rounds = 6
    out = tmp_path / "out"
    args = [f"data.path={data_file}", "data.limit=300", *SMALL, f"num_rounds={rounds}"]
    # Private: the resumed run must spend exactly what an uninterrupted one does.
    args.append("privacy=server_fixed")
    proc = start_run([*args, f"outputs_dir={out}"], {"DATABASE_URL": url})
    try:
        wait_for_round(url, 2, proc)
    finally:
        kill_tree(proc.pid, signals=(signal.SIGKILL,))
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "in_progress" and is_stale(run)
        run_id = run.id

    resumed = run_cli("resume", str(run_id), "--db", url, env={"DATABASE_URL": url})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with session_scope(get_engine(url)) as s:
        runs = s.scalars(select(Run)).all()
        assert [(r.id, r.status, r.rounds_completed) for r in runs] == [
            (run_id, "completed", rounds)
        ]
        evaluated = s.scalars(
            select(ServerEvaluation.round_number).order_by(
                ServerEvaluation.round_number
            )
        ).all()
        assert evaluated == list(range(rounds + 1))
        clients = s.scalar(select(func.count()).select_from(Client))
    keys = metric_keys(url)
    assert len(keys) == len(set(keys))
    per_client = [k for k in keys if k[0] is not None]
    assert len(per_client) == clients * rounds * PER_EPOCH
    assert {k[1] for k in per_client} == set(range(1, rounds + 1))
    with session_scope(get_engine(url)) as s:
        hospital = s.execute(
            select(ClientEvaluation.client_id, ClientEvaluation.round_number)
        ).all()
    # Every hospital scored every round once: round 3's rows from before the
    # kill went with the rest of the unfinished tail.
    assert len(hospital) == clients * rounds
    assert {r for _, r in hospital} == set(range(1, rounds + 1))
    # The accountant went on from round 2's checkpoint: the same epsilons as
    # an uninterrupted run (Flower's accountant fed identical releases).
    with session_scope(get_engine(url)) as s:
        spent = s.execute(
            select(
                PrivacySpent.round_number, PrivacySpent.epsilon, PrivacySpent.releases
            ).order_by(PrivacySpent.round_number)
        ).all()
    want = expected_epsilons(1.0, 3, 3, 1e-3, rounds)
    assert [(r, n) for r, _, n in spent] == [(r, r) for r in range(1, rounds + 1)]
    assert [e for _, e, _ in spent] == pytest.approx(want, rel=1e-9)
