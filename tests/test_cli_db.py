"""`fedpneumo db upgrade` on empty SQLite and PostgreSQL databases."""

from __future__ import annotations

import subprocess
import sys

from persistence.db import get_engine, head_revision, table_names

TABLES = {"clients", "experiments", "run_metrics", "runs", "server_evaluations"}


def fedpneumo(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI."""
    return subprocess.run(
        [sys.executable, "-m", "fedpneumo", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_upgrade_creates_tables_then_is_a_no_op(empty_db_url: str) -> None:
    first = fedpneumo("db", "upgrade", "--db", empty_db_url)
    assert first.returncode == 0, first.stderr
    assert f"empty -> {head_revision()}" in first.stdout
    assert TABLES <= set(table_names(get_engine(empty_db_url)))
    second = fedpneumo("db", "upgrade", "--db", empty_db_url)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout


def test_db_upgrade_bad_url_is_one_line_without_password() -> None:
    result = fedpneumo("db", "upgrade", "--db", "postgresql://u:hunter2@127.0.0.1:1/x")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: database postgresql://u:***@127.0.0.1:1/x: server "
        "unreachable (connection refused)"
    ]
    assert "hunter2" not in result.stdout + result.stderr
