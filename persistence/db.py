"""Engines, sessions and schema migrations: the one place that commits."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from persistence.errors import DatabaseError, InputError

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where a schema is read or migrated: every process that
# only writes rows (each client of a simulation) would pay its 0.2 s import.

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "DATABASE_URL"
DEFAULT_SQLITE_NAME = "fedpneumo.db"
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Writers wait this long for SQLite's lock instead of failing "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 60_000


def database_url_from_env() -> str | None:
    """Return ``$DATABASE_URL``, or None; the one place that reads it."""
    return os.environ.get(DATABASE_URL_ENV) or None


def resolve_database_url(
    explicit: str | None = None, sqlite_path: str | Path | None = None
) -> str:
    """Return the tracking database URL.

    Order: an explicit URL (``--db``, ``db.url``), else ``$DATABASE_URL``, else
    the SQLite file ``sqlite_path`` (default ``outputs/fedpneumo.db``).
    """
    if explicit:
        return explicit
    env = database_url_from_env()
    if env:
        return env
    path = Path(sqlite_path or Path("outputs") / DEFAULT_SQLITE_NAME)
    return f"sqlite:///{path.expanduser().resolve()}"


def default_database_url(outputs_dir: str | Path = "outputs") -> str:
    """Return ``DATABASE_URL`` when set, else the SQLite file under outputs_dir."""
    return resolve_database_url(None, Path(outputs_dir) / DEFAULT_SQLITE_NAME)


def mask_url(url: str) -> str:
    """Return the URL with its password, and any password query value, as ``***``.

    A string that does not parse as a URL is returned as given, except that
    everything between ``://`` (or the start) and the last ``@`` is masked
    when it may hold a password: the user needs to see what they typed.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        parsed = None
    if parsed is not None and "@" not in (parsed.host or ""):
        masked = parsed.render_as_string(hide_password=True)
    else:
        # Unparsed, or a raw "@" in the password that SQLAlchemy took for the
        # host: hide the whole user-info part.
        masked = _mask_userinfo(url)
    return _PASSWORD_QUERY.sub(r"\1***", masked)


# A query parameter whose name contains "password" (password=, sslpassword=).
_PASSWORD_QUERY = re.compile(r"([?&][^=&]*password[^=&]*=)[^&]*", re.IGNORECASE)


def _mask_userinfo(text: str) -> str:
    if "@" not in text or ":" not in text:
        return text
    start = text.find("://")
    start = 0 if start < 0 else start + 3
    end = text.rfind("@")
    return text[:start] + "***" + text[end:] if end > start else text


def _secrets(url: str) -> list[str]:
    """Return the password-like parts of a URL, to scrub from error texts."""
    found = [m.group(0).split("=", 1)[1] for m in _PASSWORD_QUERY.finditer(url)]
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    if password:
        found.append(str(password))
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    userinfo = url[start : max(url.rfind("@"), start)]
    if ":" in userinfo:
        # The raw password text, as a driver may echo it back.
        found.append(userinfo.split(":", 1)[1])
    return sorted({s for s in found if s}, key=len, reverse=True)


def normalize_url(url: str) -> str:
    """Return the URL with the PostgreSQL driver we ship (psycopg2) made explicit.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not
    installed; ``postgres://`` (common in hosted offerings) is accepted too.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


class DatabaseURLError(InputError, DatabaseError):
    """A database URL that cannot be used as written (exit code 2).

    Still a ``DatabaseError``, so code that handles database failures handles
    it; but the fix is in the user's input, hence InputError's exit code.
    """


VALID_URLS = "sqlite:///path/to/file.db or postgresql://user:password@host:port/db"


def backend_of(url: str) -> str:
    """Return the backend name (``sqlite`` or ``postgresql``) of a URL, or raise.

    Raises:
        DatabaseURLError: the URL does not parse, or names another backend.
    """
    try:
        backend = make_url(normalize_url(url)).get_backend_name()
    except (ArgumentError, ValueError) as exc:
        raise DatabaseURLError(_unparseable(url, exc)) from None
    if backend not in SUPPORTED_BACKENDS:
        raise DatabaseURLError(
            f"database backend {backend!r} of {mask_url(url)!r} is not supported; "
            f"use one of: {', '.join(SUPPORTED_BACKENDS)} (a URL like {VALID_URLS})"
        )
    return backend


def _unparseable(url: str, exc: Exception) -> str:
    shown = mask_url(url)
    if isinstance(exc, ValueError):
        # SQLAlchemy parsed it but int() refused the text after "host:".
        problem = "has a port that is not a number"
        if "[" in url:
            problem += " (an IPv6 host is written in brackets: [::1]:5432)"
    else:
        problem = "is not a database URL"
    hint = ""
    if "://" not in url and "@" not in url and ("/" in url or url.endswith(".db")):
        # A plain file path: show the URL the user probably meant.
        hint = f" (for that SQLite file: sqlite:///{Path(url).expanduser().resolve()})"
    return f"database URL {shown!r} {problem}; expected {VALID_URLS}{hint}"


def new_engine(url: str, **kwargs: Any) -> Engine:
    """Return ``create_engine(url, **kwargs)``, its failures as one line.

    A driver that is not installed (``postgresql+asyncpg://``) or arguments
    the dialect refuses are a DatabaseURLError naming the URL, not a traceback.
    """
    try:
        return create_engine(url, **kwargs)
    except ImportError as exc:
        driver = exc.name or str(exc)
        raise DatabaseURLError(
            f"database URL {mask_url(url)!r} needs the Python driver {driver!r}, "
            f"which is not installed; use {VALID_URLS}"
        ) from None
    except (ArgumentError, TypeError, ValueError) as exc:
        raise DatabaseURLError(
            f"database URL {mask_url(url)!r} cannot be used ({_scrub(exc, url)});"
            f" expected {VALID_URLS}"
        ) from None


def check_sqlite_path(url: str, *, create_folder: bool) -> Path | None:
    """Return the file of a SQLite URL (None in memory), checking that it can be.

    With ``create_folder`` its folder is made; a name the file system refuses
    (too long, a read-only or unwritable folder) is a one-line DatabaseError.
    """
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    path = Path(database).expanduser()
    try:
        if create_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.stat()
    except FileNotFoundError:
        pass  # the file itself: created on first connect when writing
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        where = path if exc.filename in (None, str(path)) else exc.filename
        raise DatabaseError(
            f"database {mask_url(url)}: cannot use {where} ({reason}); give a "
            "SQLite file in an existing, writable folder (sqlite:///path/to/file.db)"
        ) from None
    return path


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" event own transactions (pysqlite's default
        # deferred BEGIN can deadlock two writers that both read first).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        # Without this SQLite silently accepts orphan rows.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        # Take the write lock up front so waiting uses the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_ENGINES: dict[tuple[int, str], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(url: str) -> Engine:
    """Return this process's engine for a URL, creating it on first use.

    Engines are cached per process id: Ray actors and forked workers build
    their own pool instead of sharing sockets with the parent.
    """
    key = (os.getpid(), url)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _create_engine(url)
            _ENGINES[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    backend = backend_of(url)
    url = normalize_url(url)
    if backend == "sqlite":
        check_sqlite_path(url, create_folder=True)
        engine = new_engine(url, pool_pre_ping=True)
        _configure_sqlite(engine)
    else:
        engine = new_engine(
            url,
            pool_pre_ping=True,
            pool_size=2,
            max_overflow=3,
            connect_args={"connect_timeout": 10},
        )
    log.debug("created engine for %s", mask_url(url))
    return engine


def dispose_engines() -> None:
    """Close every pooled connection of this process."""
    with _ENGINES_LOCK:
        for (pid, _), engine in list(_ENGINES.items()):
            if pid == os.getpid():
                engine.dispose()
        _ENGINES.clear()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """Provide a transactional scope: commit on success, roll back on error."""
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def describe_error(exc: BaseException, url: str) -> str:
    """Return a one-line, password-free description of a database failure."""
    if isinstance(exc, DatabaseError):
        return str(exc)
    first = _scrub(getattr(exc, "orig", None) or exc, url)
    lowered = first.lower()
    if "password authentication failed" in lowered:
        reason = "wrong user name or password"
    elif "connection refused" in lowered or "could not connect" in lowered:
        reason = "server unreachable (connection refused)"
    elif "could not translate host name" in lowered or "timeout expired" in lowered:
        reason = "server unreachable"
    elif "does not exist" in lowered and "database" in lowered:
        reason = "database does not exist"
    elif "unable to open database file" in lowered:
        reason = (
            "cannot open the SQLite file (does its folder exist and is it writable?)"
        )
    else:
        reason = first
    return f"database {mask_url(url)}: {reason}"


def _scrub(exc: BaseException, url: str) -> str:
    """Return the first line of an error's text with the URL's secrets masked."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    for secret in _secrets(url):
        first = first.replace(secret, "***")
    return first


def _alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """Return the newest migration revision this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the migration revision a database is at (None when unversioned)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_database(url: str) -> tuple[str | None, str]:
    """Bring a database to the newest schema; return (revision before, after).

    Raises:
        DatabaseError: unreachable server, wrong credentials, or a schema at a
            migration this version of fedpneumo does not know.
    """
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    engine = get_engine(url)
    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    try:
        before = current_revision(engine)
        if before is not None and before not in {
            rev.revision for rev in script.walk_revisions()
        }:
            raise DatabaseError(
                f"database {mask_url(url)} has schema migration {before!r}, which "
                f"this fedpneumo does not know (newest known: {head!r});"
                " upgrade fedpneumo or point DATABASE_URL at another database"
            )
        if before != head:
            with engine.begin() as conn:
                config = _alembic_config()
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
            log.info(
                "migrated %s from %s to %s",
                mask_url(url),
                before or "empty",
                head,
            )
        return before, current_revision(engine) or ""
    except (OperationalError, DBAPIError, CommandError) as exc:
        raise DatabaseError(describe_error(exc, url)) from None


def table_names(engine: Engine) -> list[str]:
    """Return the table names of a database, sorted."""
    return sorted(inspect(engine).get_table_names())
