"""Faults against real components: a database outage, a killed server, failing
clients, concurrent SQLite writers. Nothing computed is lost or stored twice."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from client_app.messages import REPLY_METRICS
from fedpneumo.flower import descendants, kill_tree, process_alive
from persistence import repositories as repo
from persistence.db import get_engine, session_scope, upgrade_database
from persistence.models import (
    Client,
    ClientEvaluation,
    ClientFailure,
    Run,
    RunMetric,
    ServerEvaluation,
)
from tests.conftest import run_cli
from tests.faults import fault_app
from tests.pg_server import ThrowawayPostgres
from tests.test_federated import PER_EPOCH, assert_complete_run
from tests.writers import write_for

# Every test here starts Flower or trains: the e2e tier.
pytestmark = pytest.mark.e2e

SMALL = ("model.width=8", "simulation.num_supernodes=3")


def counts(url: str) -> dict[str, int]:
    """Row counts of the tables a run fills."""
    with session_scope(get_engine(url)) as s:
        return {
            m.__tablename__: s.scalar(select(func.count()).select_from(m))
            for m in (
                Run,
                Client,
                RunMetric,
                ServerEvaluation,
                ClientFailure,
                ClientEvaluation,
            )
        }


def metric_keys(url: str) -> list[tuple]:
    """Every (client, round, metric, step) key, duplicates included."""
    with session_scope(get_engine(url)) as s:
        return s.execute(
            select(
                RunMetric.client_id,
                RunMetric.round_number,
                RunMetric.metric_name,
                RunMetric.step,
            )
        ).all()


def _as_in_a_terminal() -> None:
    # A background job (`make test &`, CI runners) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt; a terminal's Ctrl-C has it on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `fedpneumo run` in the background, in its own session."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedpneumo", "run", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_as_in_a_terminal,
    )


def wait_for_round(url: str, round_number: int, proc: subprocess.Popen, timeout=300):  # noqa: ANN001, ANN201
    """Block until the run in url has completed a round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            with session_scope(get_engine(url)) as s:
                done = s.scalar(select(func.max(Run.rounds_completed)))
            if done is not None and done >= round_number:
                return
        except Exception:  # noqa: BLE001 - the run may not have created tables yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"round {round_number} not reached in {timeout}s")


def test_postgres_outage_mid_run_loses_nothing(
    own_pg: ThrowawayPostgres, tmp_path: Path, data_file: Path
) -> None:
    args = [f"data.path={data_file}", "data.limit=300", *SMALL, "num_rounds=6"]
    # What an undisturbed run of these settings stores: 3 clients x 6 rounds x
    # PER_EPOCH client rows, one aggregate row per reply metric and round,
    # the server's evaluations of rounds 0..6 and each hospital's of 1..6.
    undisturbed = {
        "runs": 1,
        "clients": 3,
        "run_metrics": 3 * 6 * PER_EPOCH + 6 * len(REPLY_METRICS),
        "server_evaluations": 7,
        "client_failures": 0,
        "client_evaluations": 3 * 6,
    }

    url = own_pg.create_database("outage")
    out = tmp_path / "out"
    proc = start_run([*args, f"outputs_dir={out}"], {"DATABASE_URL": url})
    try:
        wait_for_round(url, 1, proc)
        own_pg.stop("fast")
        time.sleep(10)  # rounds go on; metrics pile up in the spools
        own_pg.start()
        output, _ = proc.communicate(timeout=600)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, output[-3000:]
    assert own_pg.password not in output
    # The console says when tracking fell back to the spool and when it recovered.
    assert "tracking database unreachable" in output
    assert "tracking database reachable again" in output
    assert counts(url) == undisturbed
    assert_complete_run(get_engine(url), clients=3, rounds=6)
    keys = metric_keys(url)
    assert len(keys) == len(set(keys))
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert (run.status, run.rounds_completed) == ("completed", 6)

    for _ in range(2):  # replaying again changes nothing
        synced = run_cli("sync", "--outputs", str(out), "--db", url)
        assert synced.returncode == 0, synced.stderr
        assert "0 new rows" in synced.stdout
        assert counts(url) == undisturbed


def test_ctrl_c_marks_the_run_failed_and_leaves_no_processes(
    tmp_path: Path, data_file: Path
) -> None:
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'fedpneumo.db'}"
    # Far more rounds than the test waits for: the interrupt must land mid-run.
    args = [f"data.path={data_file}", "data.limit=300", *SMALL, "num_rounds=500"]
    proc = start_run([*args, f"outputs_dir={out}"], {})
    try:
        wait_for_round(url, 1, proc)
        helpers = descendants(proc.pid)  # SuperLink, SuperExec, ServerApp, Ray
        assert helpers
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    # 130 = the shell's code for SIGINT; -2 = died of it (either way: interrupted)
    assert proc.returncode in (130, -signal.SIGINT), output[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(process_alive(p) for p in helpers):
        time.sleep(0.5)
    assert not [p for p in helpers if process_alive(p)], "processes left behind"
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed" and run.end_time is not None
        assert "interrupted by the user" in run.error_message
        assert 1 <= run.rounds_completed < 500
        assert f"interrupted: run {run.id} marked failed" in output
        assert f"fedpneumo resume {run.id} --db {url}" in output


def test_failing_client_is_recorded_and_the_run_completes(
    tmp_path: Path, data_file: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "run",
        "--app",
        str(fault_app(tmp_path, clients=[(1, 2)])),
        f"data.path={data_file}",
        "data.limit=300",
        *SMALL,
        "num_rounds=3",
        f"outputs_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    url = f"sqlite:///{out / 'fedpneumo.db'}"
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "completed"
        failure = s.scalars(select(ClientFailure)).one()
        assert (failure.round_number, failure.client_identifier) == (2, "client-1")
        assert "injected fault: client 1 fails round 2" in failure.reason
        rounds_of_client_1 = s.scalars(
            select(RunMetric.round_number)
            .join(Client, Client.id == RunMetric.client_id)
            .where(Client.client_identifier == "client-1")
            .distinct()
        ).all()
        assert sorted(rounds_of_client_1) == [1, 3]


def test_too_few_replies_fail_the_run_with_the_reason(
    tmp_path: Path, data_file: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "run",
        "--app",
        str(fault_app(tmp_path, clients=[(2, 1)])),
        f"data.path={data_file}",
        "data.limit=300",
        *SMALL,
        "num_rounds=2",
        "strategy.min_success_fraction=1.0",
        f"outputs_dir={out}",
    )
    assert result.returncode == 1
    with session_scope(get_engine(f"sqlite:///{out / 'fedpneumo.db'}")) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed"
        assert "round 1: only 2 of 3 clients replied (need 3)" in run.error_message
        assert "client-2" in run.error_message or "node" in run.error_message
        assert "injected fault" in run.error_message
    assert "only 2 of 3 clients replied" in result.stderr


def test_eight_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    upgrade_database(url)
    with session_scope(get_engine(url)) as s:
        exp = repo.get_or_create_experiment(s, name="concurrency")
        repo.create_run(s, experiment_id=exp.id, training_mode="federated")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=write_for, args=(url, str(tmp_path), i, 5.0, queue))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    written = sum(r[0] for r in results)
    assert sum(r[1] for r in results) == 0  # no failures
    assert sum(r[2] for r in results) == 0  # nothing left in spools
    assert written > 1000
    with session_scope(get_engine(url)) as s:
        assert s.scalar(select(func.count()).select_from(RunMetric)) == written
