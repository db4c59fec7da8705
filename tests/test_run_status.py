"""A run's status tells the truth on every path, without starting Flower:
outages past the timeout, a status that waits in the spool for `sync`, runs
Flower ended behind the ServerApp's back, resumes of finished runs, and the
machine checks made before a run starts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from sqlalchemy import func, select

from fedpneumo.federated import StreamHandler, close_abandoned, finish_if_done
from fedpneumo.progress import ProgressReporter
from persistence import repositories as repo
from persistence.db import dispose_engines, get_engine, session_scope, upgrade_database
from persistence.entries import apply_entry, run_finish_entry
from persistence.models import Run, RunStatus, ServerEvaluation
from persistence.spool import DurableWriter, find_spool_dirs, pending_files, sync
from server_app.events import PREFIX
from server_app.recorder import RunRecorder, TrackingOutageError
from server_app.round_state import ROUND_STATE, save_round_state
from tests.conftest import cli, run_cli
from tests.factories import federated_run
from tests.mounts import full
from tests.pg_server import ThrowawayPostgres

METRICS = {"loss": 0.5, "accuracy": 0.8, "auroc": 0.9, "f1_score": 0.7}

# What Flower 1.42 prints when no Ray worker fits the client resources
# (simulation.client_num_gpus=1 on a machine without a GPU), trimmed.
ACTOR_POOL_LOG = """\
INFO :      Starting Flower ServerApp
WARNING :   The ActorPool is empty. The system (CPUs=2.0, GPUs=0) does not meet \
the criteria to host at least one client with resources: {'num_cpus': 1, \
'num_gpus': 1.0}. Lowering these resources could help.
ERROR :     An exception occured!! ActorPool is empty. Stopping Simulation.
ERROR :     Traceback (most recent call last):
  File "flwr/simulation/ray_transport/ray_actor.py", line 411, in __init__
    raise ValueError(
ValueError: ActorPool is empty. Stopping Simulation. Check `num_cpus` and/or \
`num_gpus` passed to the simulation engine
RuntimeError: Simulation Runtime crashed.
ERROR :     Simulation raised an exception
RuntimeError: An error was encountered. Ending simulation."""


def events(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [
        json.loads(r.getMessage().split(PREFIX, 1)[1])
        for r in caplog.records
        if PREFIX in r.getMessage()
    ]


def test_an_outage_past_the_timeout_stops_the_run_and_sync_closes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with ThrowawayPostgres() as pg:
        url = pg.create_database("outage")
        upgrade_database(url)
        run_id = federated_run(url)
        run_dir = tmp_path / "runs" / str(run_id)
        recorder = RunRecorder(url, run_id, run_dir, outage_timeout_s=1.0)
        recorder.record_evaluation(0, METRICS, 0.1)
        pg.stop("fast")
        dispose_engines()
        recorder.record_evaluation(1, METRICS, 0.1)
        recorder.update(rounds_completed=1)
        recorder.check_outage(1)  # down for less than the timeout: go on
        time.sleep(1.2)
        with pytest.raises(TrackingOutageError, match=r"unreachable for \d+ s"):
            recorder.check_outage(1)
        started = time.monotonic()
        assert recorder.close(RunStatus.FAILED, "TrackingOutageError: gone") is False
        assert time.monotonic() - started < 15  # the budget is spent: no long wait
        kinds = [e["event"] for e in events(caplog)]
        assert kinds == ["tracking_down", "tracking_pending"]
        assert events(caplog)[-1]["spool"] == str(run_dir)
        assert pg.password not in caplog.text

        pg.start()
        with session_scope(get_engine(url)) as db:
            assert db.get(Run, run_id).status == "in_progress"
        files, stored, rejected = sync(url, tmp_path)
        assert (files, rejected) == (2, 0)
        with session_scope(get_engine(url)) as db:
            run = db.get(Run, run_id)
            assert (run.status, run.error_message) == (
                "failed",
                "TrackingOutageError: gone",
            )
            assert run.rounds_completed == 1
            rounds = db.scalars(select(ServerEvaluation.round_number)).all()
            assert sorted(rounds) == [0, 1]
        assert sum(len(pending_files(f)) for f in find_spool_dirs(tmp_path)) == 0
        dispose_engines()


def test_a_recovered_database_is_announced_and_the_run_goes_on(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    writer = DurableWriter(
        "sqlite:////nonexistent-folder/x.db",
        tmp_path / "spool",
        backoff_initial_s=0,
        on_change=lambda up, detail: caplog.records.append(
            logging.makeLogRecord({"msg": f"{PREFIX}{json.dumps({'event': up})}"})
        ),
    )
    entry = run_finish_entry(1, "completed", None, {})
    assert writer.write(entry) is False and writer.down_since is not None
    writer.url = sqlite_url  # the database is reachable again
    federated_run(sqlite_url)
    assert writer.flush(0) == 0 and writer.down_since is None
    assert [e["event"] for e in events(caplog)] == [False, True]


def test_a_spooled_status_never_overwrites_a_newer_one(sqlite_url: str) -> None:
    run_id = federated_run(sqlite_url)
    with session_scope(get_engine(sqlite_url)) as db:
        repo.update_run(db, run_id=run_id, rounds_completed=4)
        repo.finish_run(db, run_id=run_id, status=RunStatus.COMPLETED)
    stale = run_finish_entry(run_id, "failed", "old outage", {"rounds_completed": 2})
    with session_scope(get_engine(sqlite_url)) as db:
        apply_entry(db, stale)
    with session_scope(get_engine(sqlite_url)) as db:
        run = db.get(Run, run_id)
        assert (run.status, run.rounds_completed, run.error_message) == (
            "completed",
            4,
            None,
        )


def test_a_run_flower_ended_is_marked_failed_with_the_cause_from_its_log(
    sqlite_url: str, tmp_path: Path
) -> None:
    run_id = federated_run(sqlite_url)
    with ProgressReporter("round", 3) as reporter:
        handler = StreamHandler(reporter, tmp_path / "flwr.log", echo=False)
        for line in ACTOR_POOL_LOG.splitlines():
            handler(line)
    with session_scope(get_engine(sqlite_url)) as db:
        run = db.get(Run, run_id)
    closed = close_abandoned(run, sqlite_url, handler)
    assert closed.status == "failed"
    assert closed.error_message.startswith(
        "Flower ended the run: ValueError: ActorPool is empty."
    )


def completed_rounds_run(url: str, run_dir: Path, done: int, planned: int) -> int:
    run_id = federated_run(url)
    with session_scope(get_engine(url)) as db:
        # The process that ran it is gone (a pid no process has).
        repo.update_run(
            db,
            run_id=run_id,
            num_rounds=planned,
            outputs_path=str(run_dir),
            pid=2**22 + 7,
        )
    run_dir.mkdir(parents=True)
    save_round_state(run_dir / ROUND_STATE, ArrayRecord(), done, {})
    return run_id


def test_resume_of_a_fully_trained_run_completes_it_without_training(
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # All rounds ran; the database was down at the end, so the run row still
    # says round 1 and in_progress, and its last rows wait in the spool.
    run_dir = tmp_path / "runs" / "1"
    run_id = completed_rounds_run(sqlite_url, run_dir, done=3, planned=3)
    with session_scope(get_engine(sqlite_url)) as db:
        repo.update_run(db, run_id=run_id, rounds_completed=1)
    spool = DurableWriter(sqlite_url, run_dir / "server" / "spool")
    spool.spool(run_finish_entry(run_id, "completed", None, {"rounds_completed": 3}))

    for _ in range(2):  # and again: still nothing to do, still completed
        code, out, err = cli(
            monkeypatch, capsys, "resume", str(run_id), "--db", sqlite_url
        )
        assert code == 0, err
        assert "nothing left to resume" in out and "Traceback" not in out + err
        with session_scope(get_engine(sqlite_url)) as db:
            run = db.get(Run, run_id)
            assert (run.status, run.rounds_completed) == ("completed", 3)


def test_finish_if_done_completes_only_runs_whose_rounds_all_ran(
    sqlite_url: str, tmp_path: Path
) -> None:
    done = completed_rounds_run(sqlite_url, tmp_path / "a", done=4, planned=4)
    left = completed_rounds_run(sqlite_url, tmp_path / "b", done=2, planned=4)
    assert finish_if_done(done, sqlite_url).status == "completed"
    assert finish_if_done(left, sqlite_url) is None
    with session_scope(get_engine(sqlite_url)) as db:
        assert db.get(Run, left).status == "in_progress"
        assert db.scalar(select(func.count()).select_from(Run)) == 2


def test_a_full_disk_leaves_no_partial_state_files(tmp_path: Path) -> None:
    with full(tmp_path / "full") as folder:
        import torch
        from flwr.app import ArrayRecord

        arrays = ArrayRecord({"w": torch.zeros(100_000)})
        with pytest.raises(OSError, match="No space left"):
            save_round_state(folder / ROUND_STATE, arrays, 1, {})
        writer = DurableWriter("sqlite:///unused.db", folder / "spool")
        with pytest.raises(OSError, match="No space left"):
            writer.spool({"kind": "metrics", "batch_id": "b", "points": "x" * 8000})
        leftovers = [p.name for p in folder.rglob("*") if p.name != ".filler"]
        assert leftovers in ([], ["spool"])


OUTPUT_CASES = [
    (["outputs_dir={file}"], "error: outputs_dir={file} is a file; give a folder"),
    (
        ["outputs_dir={read_only}"],
        "error: outputs_dir={read_only} is not writable (Read-only file system)",
    ),
    (["outputs_dir={full}"], "error: outputs_dir={full} is not writable (No space"),
]
COMPUTE_CASES = [
    (
        ["simulation.client_num_gpus=1"],
        "error: simulation.client_num_gpus=1 but this machine has no CUDA GPU; "
        "set simulation.client_num_gpus=0",
    ),
    (["simulation.client_num_cpus=512"], "error: simulation.client_num_cpus=512 but"),
]


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [("run", *c) for c in OUTPUT_CASES + COMPUTE_CASES]
    + [("train", *c) for c in OUTPUT_CASES],
    ids=[
        f"{cmd}-{name}"
        for cmd, names in (
            ("run", ["file", "read-only", "full", "no-gpu", "cpus"]),
            ("train", ["file", "read-only", "full"]),
        )
        for name in names
    ],
)
def test_resources_are_checked_before_a_run_starts(
    command: str,
    args: list[str],
    message: str,
    tmp_path: Path,
    data_file: Path,
    read_only_dir: Path,
    full_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    places = {"file": tmp_path / "a-file", "read_only": read_only_dir, "full": full_dir}
    places["file"].write_text("x")
    args = [a.format(**places) for a in args]
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(
        monkeypatch,
        capsys,
        command,
        *args,
        f"data.path={data_file}",
        f"db.sqlite_path={tmp_path / 'db' / 'tracking.db'}",
        *([] if args[0].startswith("outputs_dir") else [f"outputs_dir={tmp_path}"]),
    )
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message.format(**places)), lines
    assert not (tmp_path / "db" / "tracking.db").exists()  # nothing half-written


def test_a_resource_error_is_one_line_from_the_script(tmp_path: Path) -> None:
    done = run_cli("run", "simulation.client_num_cpus=512", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: simulation.client_num_cpus=512 but only")
    assert len(done.stderr.splitlines()) == 1 and not done.stdout


def test_a_federation_smaller_than_configured_fails_once_it_stops_growing() -> None:
    from client_app.app import app
    from server_app.config import ConfigError
    from server_app.federation import wait_for_nodes
    from tests.loopback import LoopbackGrid

    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        wait_for_nodes(LoopbackGrid(app, 2), 3, timeout_s=60, settle_s=0.5)
    assert time.monotonic() - started < 5
    assert str(error.value) == (
        "simulation.num_supernodes=3 but the federation has 2 SuperNodes; start "
        'it with `flwr run . --federation-config "num-supernodes=3"`, or pass '
        "simulation.num_supernodes=2 in the overrides"
    )
    assert wait_for_nodes(LoopbackGrid(app, 3), 3, settle_s=0.5) == 3


class _Planted:
    """A pickle that runs code when loaded: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _bad_round_states(run_dir: Path, marker: Path) -> dict[str, Callable[[], None]]:
    state = run_dir / ROUND_STATE

    def write(data: bytes) -> None:
        state.write_bytes(data)

    def other_model() -> None:
        from client_app.model import build_model

        weights = build_model("resnet18", width=4).state_dict()
        save_round_state(state, ArrayRecord(weights), 1, {})

    return {
        "missing": lambda: None,
        "random-bytes": lambda: write(os.urandom(2000)),
        "truncated": lambda: (other_model(), write(state.read_bytes()[:300])),
        "code-in-a-pickle": lambda: torch.save({"round": _Planted(marker)}, state),
        "plain-pickle": lambda: write(pickle.dumps({"round": _Planted(marker)})),
        "no-round": lambda: torch.save({"state_dict": {}}, state),
        "other-model": other_model,
        "legacy-pickle": lambda: (run_dir / "round_state.pkl").write_bytes(
            pickle.dumps({"round": 1})
        ),
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no round checkpoint at {state}"),
        ("random-bytes", "{state} is not a readable round checkpoint"),
        ("truncated", "{state} is not a readable round checkpoint"),
        ("code-in-a-pickle", "{state} holds objects a round checkpoint never holds"),
        ("plain-pickle", "{state} is not a readable round checkpoint (not a file"),
        ("no-round", "{state} is not a fedpneumo round checkpoint"),
        ("other-model", "{state} holds weights that do not fit run 1's model (cnn)"),
        ("legacy-pickle", "{run_dir}/round_state.pkl is a round checkpoint in the old"),
    ],
)
def test_resume_refuses_a_bad_round_checkpoint_before_changing_anything(
    case: str,
    message: str,
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from server_app.compose import load_config, snapshot

    run_dir = tmp_path / "runs" / "1"
    run_dir.mkdir(parents=True)
    run_id = federated_run(sqlite_url)
    cfg = load_config(["model.width=8", f"outputs_dir={tmp_path}"])
    with session_scope(get_engine(sqlite_url)) as db:
        repo.update_run(
            db,
            run_id=run_id,
            config=snapshot(cfg),
            num_rounds=3,
            rounds_completed=1,
            outputs_path=str(run_dir),
        )
        repo.add_server_evaluation(db, run_id=run_id, round_number=2, metrics=METRICS)
        repo.finish_run(db, run_id=run_id, status=RunStatus.FAILED, error_message="x")
    marker = tmp_path / "code-ran"
    _bad_round_states(run_dir, marker)[case]()

    started = time.monotonic()
    code, out, err = cli(monkeypatch, capsys, "resume", str(run_id), "--db", sqlite_url)
    assert time.monotonic() - started < 20  # refused before Flower starts
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    expected = message.format(state=run_dir / ROUND_STATE, run_dir=run_dir)
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert not marker.exists()
    with session_scope(get_engine(sqlite_url)) as db:
        run = db.get(Run, run_id)
        assert (run.status, run.rounds_completed) == ("failed", 1)
        assert db.scalar(select(func.count()).select_from(ServerEvaluation)) == 1


def test_resume_never_creates_a_database(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "new" / "fedpneumo.db"
    code, out, err = cli(
        monkeypatch, capsys, "resume", "5", "--db", f"sqlite:///{missing}"
    )
    assert code == 1 and err.startswith(
        f"error: database file {missing} does not exist"
    )
    assert not missing.exists() and not missing.parent.exists()
