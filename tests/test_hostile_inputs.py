"""Hostile input to the read-only commands, db upgrade and sync: one line, no trace.

Each case: the exit code, exactly one ``error:`` line, no traceback, no
password, and no file left behind where one could be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from persistence import repositories as repo
from persistence.db import describe_error, get_engine, mask_url, session_scope
from persistence.entries import MetricBatch
from persistence.errors import RunNotFoundError
from persistence.models import RunMetric
from persistence.repositories import MetricPoint
from tests.conftest import REPO_ROOT, cli
from tests.factories import federated_run
from tests.mounts import read_only

SECRET = "secretpw"
LONG = "a" * 300  # past NAME_MAX (255) of every common file system


def one_error(code: int, out: str, err: str) -> str:
    """Assert the shape every failure here must have; return its error line."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    assert SECRET not in out + err
    return lines[0]


@pytest.fixture
def run_db(sqlite_url: str) -> str:
    """A migrated SQLite file holding run 1."""
    assert federated_run(sqlite_url) == 1
    return sqlite_url


def metric_entry(run_id: int = 1) -> dict:
    point = MetricPoint("val_auroc", 0.5, 1, "val", 1)
    return MetricBatch(run_id=run_id, points=[point]).to_entry()


def spooled(root: Path, files: dict[str, str]) -> Path:
    """Write spool files (name -> text) under root/runs/1/spool; return it."""
    folder = root / "runs" / "1" / "spool"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


# 1. Run ids past 64 bits -----------------------------------------------------

HUGE_IDS = ["9223372036854775808", "99999999999999999999"]
RUN_ID_COMMANDS: dict[str, Callable[[str, Path], list[str]]] = {
    "show": lambda i, t: ["runs", "show", i],
    "compare": lambda i, t: ["runs", "compare", "1", i],
    "plot": lambda i, t: ["runs", "plot", i, "-o", str(t / "curves.png")],
    "export": lambda i, t: ["runs", "export", i, "-o", str(t / "run.json")],
    "resume": lambda i, t: ["resume", i],
}


@pytest.mark.parametrize("run_id", HUGE_IDS)
@pytest.mark.parametrize("command", list(RUN_ID_COMMANDS))
def test_run_ids_past_64_bits_do_not_exist(
    command: str,
    run_id: str,
    run_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = RUN_ID_COMMANDS[command](run_id, tmp_path)
    code, out, err = cli(monkeypatch, capsys, *args, "--db", run_db)
    assert code == 2
    assert one_error(code, out, err) == f"error: run {run_id} does not exist"
    assert not (tmp_path / "curves.png").exists()
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("run_id", [2**63, 2**64, 10**20])
def test_require_run_treats_an_unstorable_id_as_missing(
    run_db: str, run_id: int
) -> None:
    with session_scope(get_engine(run_db)) as session:
        with pytest.raises(RunNotFoundError, match=f"run {run_id} does not exist"):
            repo.require_run(session, run_id)
        assert repo.require_run(session, 1).id == 1  # the session still works


# 2. Database URLs that cannot be used --------------------------------------

VALID = "expected sqlite:///path/to/file.db or postgresql://user:password@host:port/db"
BAD_URLS: dict[str, tuple[Callable[[Path], str], int, str]] = {
    "port-not-a-number": (
        lambda t: f"postgresql://u:{SECRET}@127.0.0.1:abc/x",
        2,
        "database URL 'postgresql://***@127.0.0.1:abc/x' has a port that is not a "
        f"number; {VALID}",
    ),
    "ipv6-unclosed": (
        lambda t: f"postgresql://u:{SECRET}@[::1:1/x",
        2,
        "has a port that is not a number (an IPv6 host is written in brackets",
    ),
    "driver-not-installed": (
        lambda t: f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:1/x",
        2,
        "database URL 'postgresql+asyncpg://u:***@127.0.0.1:1/x' needs the Python "
        "driver 'asyncpg', which is not installed",
    ),
    "not-a-url": (
        lambda t: "notaurl",
        2,
        f"database URL 'notaurl' is not a database URL; {VALID}",
    ),
    "plain-path": (
        lambda t: str(t / "x.db"),
        2,
        f"{VALID} (for that SQLite file: sqlite:///{{t}}/x.db)",
    ),
    "userinfo-without-scheme": (
        lambda t: f"u:{SECRET}@host/x",
        2,
        "database URL '***@host/x' is not a database URL",
    ),
    "unsupported-backend": (
        lambda t: f"mysql://u:{SECRET}@h/x",
        2,
        "database backend 'mysql' of 'mysql://u:***@h/x' is not supported",
    ),
    "file-name-too-long": (
        lambda t: f"sqlite:///{t / LONG}.db",
        1,
        "(file name too long); give a SQLite file in an existing, writable folder",
    ),
    "folder-name-too-long": (
        lambda t: f"sqlite:///{t / LONG / 'x.db'}",
        1,
        "(file name too long); give a SQLite file in an existing, writable folder",
    ),
    "password-in-query": (
        lambda t: f"postgresql://u@127.0.0.1:1/x?password={SECRET}",
        1,
        "database postgresql://u@127.0.0.1:1/x?password=***: server unreachable",
    ),
}
URL_COMMANDS: dict[str, list[str]] = {
    "db-upgrade": ["db", "upgrade"],
    "runs-list": ["runs", "list"],
    "runs-export": ["runs", "export", "1"],
    "sync": ["sync"],  # --outputs added below, with a spool file pending
}


@pytest.mark.parametrize("via", ["--db", "DATABASE_URL"])
@pytest.mark.parametrize("command", list(URL_COMMANDS))
@pytest.mark.parametrize("case", list(BAD_URLS))
def test_unusable_database_urls_are_one_line(
    case: str,
    command: str,
    via: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_url, expected_code, message = BAD_URLS[case]
    url = make_url(tmp_path)
    args = list(URL_COMMANDS[command])
    if command == "sync":
        spooled(tmp_path / "out", {"1.json": json.dumps(metric_entry())})
        args += ["--outputs", str(tmp_path / "out")]
    if via == "--db":
        args += ["--db", url]
    else:
        monkeypatch.setenv("DATABASE_URL", url)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == expected_code, err
    assert message.replace("{t}", str(tmp_path)) in one_error(code, out, err)
    assert sorted(tmp_path.rglob("*")) == before  # no database file, no folder


def test_db_upgrade_into_a_read_only_folder_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with read_only(tmp_path / "ro") as folder:
        url = f"sqlite:///{folder / 'sub' / 'new.db'}"
        code, out, err = cli(monkeypatch, capsys, "db", "upgrade", "--db", url)
        assert not (folder / "sub").exists()
    assert code == 1
    assert one_error(code, out, err) == (
        f"error: database {url}: cannot use {folder / 'sub'} (read-only file "
        "system); give a SQLite file in an existing, writable folder "
        "(sqlite:///path/to/file.db)"
    )


# 3. Passwords in query parameters -------------------------------------------

# url -> (as shown, the password as a driver may echo it back, or None)
MASKED: dict[str, tuple[str, str | None]] = {
    f"postgresql://u@h:1/x?password={SECRET}": (
        "postgresql://u@h:1/x?password=***",
        SECRET,
    ),
    f"postgresql://u:{SECRET}@h/x?sslpassword={SECRET}&a=b": (
        "postgresql://u:***@h/x?a=b&sslpassword=***",
        SECRET,
    ),
    f"postgresql://u@h/x?PassWord={SECRET}": (
        "postgresql://u@h/x?PassWord=***",
        SECRET,
    ),
    f"postgresql://u:{SECRET}@h:abc/x": ("postgresql://***@h:abc/x", SECRET),
    # A raw "@" in the password: SQLAlchemy takes its tail for the host.
    f"postgresql://u:pa@{SECRET}@h/x": ("postgresql://***@h/x", f"pa@{SECRET}"),
    f"u:{SECRET}@host": ("***@host", SECRET),
    "notaurl": ("notaurl", None),
}


@pytest.mark.parametrize("url", list(MASKED))
def test_mask_url_hides_every_password(url: str) -> None:
    shown, password = MASKED[url]
    assert mask_url(url) == shown
    if password is not None:
        message = describe_error(RuntimeError(f"auth failed for {password}"), url)
        assert SECRET not in message and message.endswith("auth failed for ***")


# 4. Output paths that are folders -------------------------------------------


@pytest.mark.parametrize("output", ["", ".", "/", "..", "{tmp}"])
def test_export_to_a_folder_is_one_line(
    output: str,
    run_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    output = output.replace("{tmp}", str(tmp_path))
    args = ["runs", "export", "1", "--db", run_db, "-o", output]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 2
    line = one_error(code, out, err)
    assert line.startswith("error: --output '") and "is a folder, not a file" in line
    assert list(work.iterdir()) == []
    assert [p for p in tmp_path.iterdir() if not p.name.startswith("tracking.db")] == [
        work
    ]


# 5. Output that cannot be written --------------------------------------------

STDOUT_COMMANDS = {
    "runs-list": ["runs", "list"],
    "runs-show": ["runs", "show", "1"],
    "runs-export": ["runs", "export", "1"],
    "help": ["--help"],
}


def fedpneumo(args: list[str], db: str, stdout: Any) -> subprocess.Popen[str]:
    """Start the CLI with stdout going where the test says."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    db_args = ["--db", db] if args[0] == "runs" else []
    return subprocess.Popen(
        [sys.executable, "-m", "fedpneumo", *args, *db_args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )


@pytest.mark.parametrize("command", list(STDOUT_COMMANDS))
def test_a_full_stdout_is_one_line(command: str, run_db: str) -> None:
    with open("/dev/full", "w") as full:
        proc = fedpneumo(STDOUT_COMMANDS[command], run_db, full)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.splitlines() == [
        "error: cannot write the output (No space left on device)"
    ]


@pytest.mark.parametrize("command", list(STDOUT_COMMANDS))
def test_a_reader_that_went_away_ends_quietly(command: str, run_db: str) -> None:
    proc = fedpneumo(STDOUT_COMMANDS[command], run_db, subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -1` exiting before the command writes
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141  # 128 + SIGPIPE, as a Unix tool's
    assert err == ""


# 6. sync: malformed spool files and databases it cannot use -----------------

MALFORMED = {
    "array": "[]",
    "string": '"str"',
    "number": "42",
    "null": "null",
    "not-json": "{not json",
    "too-deep": "[" * 100_000,
    "unknown-kind": '{"kind": "weights", "run_id": 1}',
    "points-null": '{"kind": "metrics", "run_id": 1, "points": null}',
    "points-uneven": json.dumps(
        {**metric_entry(), "points": {**metric_entry()["points"], "steps": []}}
    ),
    "recorded-at-number": json.dumps({**metric_entry(), "recorded_at": 5}),
    "recorded-at-text": json.dumps({**metric_entry(), "recorded_at": "noon"}),
    "run-id-float": json.dumps({**metric_entry(), "run_id": 1e20}),
    "run-id-huge": json.dumps({**metric_entry(), "run_id": 10**20}),
    "run-id-unknown": json.dumps(metric_entry(run_id=77)),
    "evaluation-metrics-list": json.dumps(
        {"kind": "server_evaluation", "run_id": 1, "round_number": 1, "metrics": []}
    ),
    "hospitals-not-a-list": json.dumps(
        {"kind": "client_evaluations", "run_id": 1, "round_number": 1, "scores": {}}
    ),
    "hospital-without-name": json.dumps(
        {
            "kind": "client_evaluations",
            "run_id": 1,
            "round_number": 1,
            "scores": [{"metrics": {"auroc": 0.5}}],
        }
    ),
    "hospital-auroc-text": json.dumps(
        {
            "kind": "client_evaluations",
            "run_id": 1,
            "round_number": 1,
            "scores": [{"client_identifier": "client-0", "metrics": {"auroc": "hi"}}],
        }
    ),
    "test-without-round": json.dumps(
        {"kind": "test_evaluation", "run_id": 1, "metrics": {"auroc": 0.5}}
    ),
    "finish-unknown-field": json.dumps(
        {"kind": "run_finish", "run_id": 1, "status": "completed", "fields": {"foo": 1}}
    ),
    "finish-fields-list": json.dumps(
        {"kind": "run_finish", "run_id": 1, "status": "completed", "fields": [1]}
    ),
    "finish-start-time": json.dumps(
        {
            "kind": "run_finish",
            "run_id": 1,
            "status": "completed",
            "fields": {"start_time": "notatime"},
        }
    ),
    "finish-unknown-run": json.dumps(
        {"kind": "run_finish", "run_id": 77, "status": "completed", "error": None}
    ),
}


def stored_metrics(url: str) -> int:
    with session_scope(get_engine(url)) as session:
        return session.scalar(select(func.count()).select_from(RunMetric))


@pytest.mark.parametrize("case", list(MALFORMED))
def test_sync_sets_a_malformed_file_aside_and_goes_on(
    case: str,
    run_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The bad file sorts first: it must not block the good one after it.
    folder = spooled(
        tmp_path / "out",
        {"1-bad.json": MALFORMED[case], "2-good.json": json.dumps(metric_entry())},
    )
    args = ["sync", "--outputs", str(tmp_path / "out"), "--db", run_db]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 1
    assert one_error(code, out, err) == (
        "error: 1 of 2 spooled batches were rejected; each is named in a line "
        "above, with the reason and where the file is now"
    )
    assert "1 new rows, 1 rejected" in out
    assert list(folder.iterdir()) == []
    assert [p.name for p in (folder.parent / "rejected").iterdir()] == ["1-bad.json"]
    assert stored_metrics(run_db) == 1
    (record,) = [r for r in caplog.records if "1-bad.json" in r.getMessage()]
    assert record.levelname == "ERROR" and "\n" not in record.getMessage()


ODD_SPOOLS: dict[str, tuple[Callable[[Path], None], str]] = {
    "json-named-folder": (
        lambda spool: (spool / "1-bad.json").mkdir(),
        "it is not a regular file; moved to",
    ),
    "rejected-is-a-file": (
        lambda spool: (
            (spool / "1-bad.json").write_text("[]"),
            (spool.parent / "rejected").write_text("not a folder"),
        ),
        "it stays in the spool: cannot move it to",
    ),
}


@pytest.mark.parametrize("case", list(ODD_SPOOLS))
def test_sync_odd_spool_files_are_one_line_each(
    case: str,
    run_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup, logged = ODD_SPOOLS[case]
    folder = spooled(tmp_path / "out", {"2-good.json": json.dumps(metric_entry())})
    setup(folder)
    args = ["sync", "--outputs", str(tmp_path / "out"), "--db", run_db]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 1
    assert "1 of 2 spooled batches were rejected" in one_error(code, out, err)
    assert stored_metrics(run_db) == 1
    assert not (folder / "2-good.json").exists()
    (record,) = [r for r in caplog.records if "1-bad.json" in r.getMessage()]
    assert logged in record.getMessage()


def text_file(t: Path) -> str:
    (t / "notes.db").write_text("not a database")
    return f"sqlite:///{t / 'notes.db'}"


def empty_sqlite(t: Path) -> str:
    import sqlite3

    sqlite3.connect(t / "empty.db").close()
    return f"sqlite:///{t / 'empty.db'}"


STOPPING_DATABASES: dict[str, tuple[Callable[[Path], str | None], str]] = {
    "text-file": (text_file, "database sqlite:///{t}/notes.db: file is not a database"),
    "not-migrated": (
        empty_sqlite,
        "database sqlite:///{t}/empty.db has no fedpneumo runs table",
    ),
    "default-file-missing": (
        lambda t: None,
        "database sqlite:///{t}/out/fedpneumo.db does not exist; spooled entries "
        "belong in the tracking database their runs were recorded in: give it "
        "with --db",
    ),
    "server-down": (
        lambda t: f"postgresql://u:{SECRET}@127.0.0.1:1/x",
        "database postgresql://u:***@127.0.0.1:1/x: server unreachable (connection "
        "refused); 2 spooled files left in place for the next fedpneumo sync",
    ),
}


@pytest.mark.parametrize("case", list(STOPPING_DATABASES))
def test_sync_stops_on_a_database_it_cannot_use_and_keeps_the_files(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_db, message = STOPPING_DATABASES[case]
    url = make_db(tmp_path)
    files = {"1.json": json.dumps(metric_entry()), "2.json": "[]"}
    folder = spooled(tmp_path / "out", files)
    args = ["sync", "--outputs", str(tmp_path / "out")]
    code, out, err = cli(monkeypatch, capsys, *args, *(["--db", url] if url else []))
    assert code == 1
    assert message.replace("{t}", str(tmp_path)) in one_error(code, out, err)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert not (folder.parent / "rejected").exists()
    assert not (tmp_path / "out" / "fedpneumo.db").exists()
