"""Read-only access to a tracking database, for reports and dashboards."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from persistence.db import backend_of, describe_error, mask_url, normalize_url
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
        return create_engine(
            url,
            connect_args={
                "connect_timeout": 10,
                "options": "-c default_transaction_read_only=on",
            },
        )
    database = make_url(url).database
    if not database or database == ":memory:":
        raise DatabaseError(f"database {mask_url(url)} is in memory: it holds no runs")
    path = Path(database).expanduser().resolve()
    if not path.is_file():
        raise DatabaseError(
            f"database file {path} does not exist (check --db or DATABASE_URL)"
        )
    uri = path.as_uri() + "?mode=ro"
    return create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
    )


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
