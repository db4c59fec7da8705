"""Read-only access to a tracking database, for reports and dashboards."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from persistence.db import (
    backend_of,
    check_sqlite_path,
    describe_error,
    mask_url,
    new_engine,
    normalize_url,
)
from persistence.errors import DatabaseError
from persistence.models import Run


def readonly_engine(url: str) -> Engine:
    """Return an engine that can only read the database at ``url``.

    A SQLite file is opened in SQLite's read-only mode and never created; a
    PostgreSQL session runs with ``default_transaction_read_only``.
    """
    backend = backend_of(url)
    url = normalize_url(url)
    if backend == "postgresql":
        return new_engine(
            url,
            connect_args={
                "connect_timeout": 10,
                "options": "-c default_transaction_read_only=on",
            },
        )
    path = check_sqlite_path(url, create_folder=False)
    if path is None:
        raise DatabaseError(f"database {mask_url(url)} is in memory: it holds no runs")
    path = path.resolve()
    if not path.is_file():
        raise DatabaseError(
            f"database file {path} does not exist (check --db or DATABASE_URL)"
        )
    uri = readonly_uri(path)
    return create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
    )


def readonly_uri(path: Path) -> str:
    """Return the SQLite URI that reads ``path`` without ever writing to it.

    Reading a WAL-mode file (ours always are) makes SQLite create ``-shm``
    beside it, which a read-only folder or medium refuses. When the file alone
    is the whole database (no ``-wal`` with changes beside it), it is opened
    as immutable instead, which needs no ``-shm``.
    """
    uri = path.as_uri() + "?mode=ro"
    if not _in_wal_mode(path) or _readable(uri):
        return uri
    wal = path.with_name(path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        raise DatabaseError(
            f"database file {path} cannot be read here: SQLite cannot create "
            f"{path.name}-shm beside it and {wal.name} holds changes not yet in "
            f"the file; copy {path.name}-shm along with it, or checkpoint it where "
            f"it was written (sqlite3 {path.name} 'PRAGMA wal_checkpoint(TRUNCATE)')"
            " and copy the .db file alone"
        )
    return uri + "&immutable=1"


def _in_wal_mode(path: Path) -> bool:
    # Bytes 18 and 19 of the header are the file format's write and read
    # versions: 2 means WAL (sqlite.org/fileformat.html#file_format_version_numbers).
    try:
        with path.open("rb") as fh:
            header = fh.read(20)
    except OSError:
        return False  # let the connection report it
    return len(header) == 20 and header[18:20] == b"\x02\x02"


def _readable(uri: str) -> bool:
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return False
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


@contextmanager
def read_session(url: str) -> Iterator[Session]:
    """Open a read-only session; database failures become one-line DatabaseErrors."""
    engine = readonly_engine(url)
    try:
        with Session(engine) as session:
            if not inspect(session.connection()).has_table(Run.__tablename__):
                raise DatabaseError(
                    f"database {mask_url(url)} has no fedpneumo runs table "
                    "(is it a fedpneumo tracking database?)"
                )
            yield session
    except DBAPIError as exc:
        raise DatabaseError(describe_error(exc, url)) from None
    finally:
        engine.dispose()
