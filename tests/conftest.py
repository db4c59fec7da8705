"""Shared fixtures: real SQLite files and a real, throwaway PostgreSQL server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from fedpneumo.pg_server import ThrowawayPostgres
from persistence.db import dispose_engines, get_engine, upgrade_database

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres]:
    """Start one PostgreSQL server for the whole test session."""
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
def engine(db_url: str) -> Engine:
    """This process's engine on a migrated database."""
    return get_engine(db_url)


@pytest.fixture(autouse=True)
def _no_database_url_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's DATABASE_URL out of tests."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
