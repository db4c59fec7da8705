"""Shared fixtures: real SQLite files and a real, throwaway PostgreSQL server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine

from persistence.db import dispose_engines, get_engine, upgrade_database
from tests.pg_server import ThrowawayPostgres

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
BACKENDS = ("sqlite", "postgres")
# read_only_dir / full_dir: real read-only and full file systems;
# browser: headless Chromium (tests/dashboard.py).
pytest_plugins = ["tests.mounts", "tests.dashboard"]

# Modules whose tests inspect runs a module-scoped fixture makes once: under
# `make test` (xdist) each goes whole to one worker. Every other test is
# scheduled on its own, so the long ones spread over the workers instead of
# queueing behind each other in one module.
SHARED_RUN_MODULES = {"test_federated.py", "test_reports.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Schedule by test, keeping each shared-run module on one worker.

    (xdist's own loadgroup cannot do it on pytest 9.2: it renames items
    through an attribute pytest no longer reads.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in SHARED_RUN_MODULES else nodeid

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres]:
    """Start one PostgreSQL server for the whole test session."""
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture
def own_pg() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL server of the test's own, which it may stop and start."""
    with ThrowawayPostgres() as server:
        yield server


def make_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return the URL of a fresh, empty database of the given backend."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'tracking.db'}"
    server: ThrowawayPostgres = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on SQLite and on PostgreSQL (ids name the backend)."""
    yield make_db_url(request.param, request, tmp_path)
    dispose_engines()


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A fresh database with the schema migrated to head."""
    upgrade_database(empty_db_url)
    return empty_db_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A migrated SQLite file, for behaviour that does not depend on the backend."""
    url = f"sqlite:///{tmp_path / 'tracking.db'}"
    upgrade_database(url)
    yield url
    dispose_engines()


@pytest.fixture
def engine(db_url: str) -> Engine:
    """This process's engine on a migrated database."""
    return get_engine(db_url)


@pytest.fixture(autouse=True)
def _no_database_url_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's DATABASE_URL out of tests."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real PneumoniaMNIST file, or a small generated one in its layout."""
    if REAL_DATA.exists():
        return REAL_DATA
    from client_app.data import make_synthetic

    data = make_synthetic(n_train=600, n_val=200, seed=3)
    return save_npz(data, tmp_path_factory.mktemp("data") / "pneumoniamnist.npz")


@pytest.fixture(scope="session")
def data_with_test(tmp_path_factory: pytest.TempPathFactory, data_file: Path) -> Path:
    """``data_file`` with a test split: 300 training images moved to ``test``.

    Only the mechanics are under test (a split called test is scored once at
    the end and stored apart); the shared file's own test split is withheld.
    """
    with np.load(data_file) as npz:
        arrays = {key: npz[key] for key in npz.files}
    held = 300
    for kind in ("images", "labels"):
        arrays[f"test_{kind}"] = arrays[f"train_{kind}"][-held:]
        arrays[f"train_{kind}"] = arrays[f"train_{kind}"][:-held]
    path = tmp_path_factory.mktemp("data-with-test") / "with_test.npz"
    np.savez(path, **arrays)
    return path


def save_npz(data: object, path: Path) -> Path:
    """Save an ``XrayData`` in MedMNIST's ``<split>_images/labels`` layout."""
    np.savez(
        path,
        **{
            f"{name}_{kind}": getattr(split, kind)
            for name, split in data.splits.items()  # type: ignore[attr-defined]
            for kind in ("images", "labels")
        },
    )
    return path


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the fedpneumo CLI in a subprocess, as a script would.

    Its output is a pipe with no terminal width: the COLUMNS/LINES that a
    test runner's workers may set are not passed on.
    """
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "fedpneumo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**base, **(env or {})},
    )


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run ``fedpneumo args`` through the script's entry point, in this process.

    Faster than ``run_cli`` where torch is already imported; the exit code and
    the error line come from the real ``main``.
    """
    from fedpneumo.cli import main

    monkeypatch.setattr(sys, "argv", ["fedpneumo", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 1), out, err
