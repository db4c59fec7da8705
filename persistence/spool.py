"""Durable, idempotent writes: spool to local files first, then the database.

Every batch is written to a file before the database is tried and deleted
after commit. When the database is down, training goes on: pending files are
retried with backoff, replayed at the end of a run, or by ``fedpneumo sync``.
Replaying is safe any number of times because the writes are idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, inspect
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    StatementError,
)
from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

from persistence.db import (
    DatabaseError,
    backend_of,
    check_sqlite_path,
    describe_error,
    get_engine,
    mask_url,
    normalize_url,
    session_scope,
)
from persistence.entries import BadEntry, apply_entry, check_entry
from persistence.errors import InputError
from persistence.models import Run

log = logging.getLogger(__name__)

SPOOL_DIRNAME = "spool"
REJECTED_DIRNAME = "rejected"
# SQLite failures that waiting does not fix: a full disk, a read-only file.
PERMANENT = re.compile(r"database or disk is full|readonly database", re.I)
# The entry that closes a run whose database was down at its end; replayed
# after every other entry so a run becomes completed only with all its rows.
RUN_FINISH = "run_finish"


def is_transient(exc: BaseException) -> bool:
    """Return True for failures that may pass: server down, connection lost."""
    if isinstance(exc, IntegrityError):
        return False
    if PERMANENT.search(str(exc)):
        return False
    if isinstance(exc, OperationalError | DatabaseError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class DurableWriter:
    """Write entries through a spool folder into the database, with backoff.

    ``on_change(reachable, detail)`` is called when the database goes down
    (False) and when it is reachable again (True); ``down_since`` is the
    ``time.monotonic()`` at which the current outage began, None while up.
    """

    def __init__(
        self,
        url: str,
        spool_dir: Path,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        on_change: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.url = url
        self.spool_dir = Path(spool_dir)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._delay = backoff_initial_s
        self._next_attempt = 0.0
        self._warned = False
        self.on_change = on_change
        self.down_since: float | None = None

    # Spool files -------------------------------------------------------------

    def spool(self, entry: Mapping[str, Any]) -> Path:
        """Write an entry to the spool atomically and return its file."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{entry['batch_id']}.json"
        path = self.spool_dir / name
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("w") as fh:
                fh.write(json.dumps(entry))  # the C encoder; dump() does not use it
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a file
            raise
        return path

    def pending(self) -> list[Path]:
        """Return the spooled files not yet committed, oldest first."""
        return pending_files(self.spool_dir)

    # Writing -----------------------------------------------------------------

    def write(self, entry: Mapping[str, Any]) -> bool:
        """Spool an entry, then try to commit it and anything still pending.

        Returns True when nothing is left pending. Never raises for a database
        that is down: the entry stays spooled and is retried later.
        """
        path = self.spool(entry)
        if time.monotonic() < self._next_attempt:
            return False
        return self._drain_once(fresh=(path, entry))

    def _drain_once(self, fresh: tuple[Path, Mapping[str, Any]] | None = None) -> bool:
        try:
            older = [p for p in self.pending() if fresh is None or p != fresh[0]]
            replay(self.url, older)
            if fresh is not None:  # already in memory: no need to read it back
                commit_entry(self.url, *fresh)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._delay = min(self._delay * 2, self.backoff_max_s)
            self._next_attempt = time.monotonic() + self._delay
            if not self._warned:
                detail = str(exc).splitlines()[0]
                log.warning(
                    "database %s unavailable; metrics are spooled in %s and "
                    "retried (%s)",
                    mask_url(self.url),
                    self.spool_dir,
                    detail,
                )
                self._warned = True
                self.down_since = time.monotonic()
                if self.on_change:
                    self.on_change(False, detail)
            return False
        self.reachable()
        self._delay = self.backoff_initial_s
        self._next_attempt = 0.0
        return True

    def reachable(self) -> None:
        """Note that a write just went through: announce the end of an outage."""
        if self._warned:
            log.info("database %s reachable again", mask_url(self.url))
            self._warned = False
            self.down_since = None
            if self.on_change:
                self.on_change(True, "")

    def flush(self, timeout_s: float) -> int:
        """Replay pending entries, retrying with backoff for up to timeout_s.

        Returns the number of files still pending (0 = all committed).
        """
        if not self.pending():
            return 0
        if timeout_s <= 0:
            self._drain_once()
            return len(self.pending())
        try:
            for attempt in Retrying(
                stop=stop_before_delay(timeout_s),
                wait=wait_exponential(
                    multiplier=self.backoff_initial_s, max=self.backoff_max_s
                ),
                retry=retry_if_exception(is_transient),
                reraise=True,
            ):
                with attempt:
                    replay(self.url, self.pending())
        except Exception as exc:
            if not is_transient(exc):
                raise
        return len(self.pending())


def pending_files(spool_dir: Path) -> list[Path]:
    """Return the committed-not-yet spool files of a folder, oldest first."""
    if not spool_dir.is_dir():
        return []
    return sorted(spool_dir.glob("*.json"))


def commit_entry(url: str, path: Path, entry: Mapping[str, Any]) -> int:
    """Commit one entry in its own transaction, then delete its spool file."""
    with session_scope(get_engine(url)) as session:
        stored = apply_entry(session, entry)
    path.unlink(missing_ok=True)
    return stored


def replay(url: str, files: Iterable[Path]) -> int:
    """Commit spooled files one transaction each, deleting each after commit.

    Returns rows newly stored. Raises on the first failure, leaving that file
    and the ones after it pending.
    """
    stored = 0
    for path in files:
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # committed meanwhile by another process
        stored += commit_entry(url, path, entry)
    return stored


def find_spool_dirs(root: Path) -> list[Path]:
    """Return every spool folder under root."""
    return sorted(p for p in Path(root).rglob(SPOOL_DIRNAME) if p.is_dir())


def sync(url: str, root: Path) -> tuple[int, int, int]:
    """Replay every spool under root; return (files, rows stored, rejected).

    Entries that can never land (malformed, or refused for good: say their run
    was deleted) are moved to a ``rejected`` folder beside their spool, one
    log line each, and the replay goes on with the others. A database failure
    (unreachable, full, not a tracking database) stops it with a one-line
    DatabaseError and leaves the files in place for the next sync. Nothing is
    written, and no SQLite file created, when nothing is pending.
    """
    entries, finishes = [], []
    for folder in find_spool_dirs(root):
        for path in pending_files(folder):
            (finishes if RUN_FINISH in path.name else entries).append(path)
    pending = entries + finishes
    if not pending:
        return 0, 0, 0
    try:
        engine = _tracking_engine(url)
    except DBAPIError as exc:
        raise _stopped(exc, url, len(pending)) from None
    files = stored = rejected = 0
    for index, path in enumerate(pending):
        try:
            entry = _read_entry(path)
            if entry is not None:
                with session_scope(engine) as session:
                    stored += apply_entry(session, entry)
        except Exception as exc:
            if not _refused_for_good(exc):
                if isinstance(exc, DBAPIError | DatabaseError):
                    raise _stopped(exc, url, len(pending) - index) from None
                raise
            _reject(path, _reason(exc))
            files += 1
            rejected += 1
            continue
        if entry is None:
            continue  # committed meanwhile by another process
        files += 1
        path.unlink(missing_ok=True)
    return files, stored, rejected


def _stopped(exc: BaseException, url: str, left: int) -> DatabaseError:
    """Return the one-line error that ends a sync the database cannot take."""
    files = "file" if left == 1 else "files"
    return DatabaseError(
        f"{describe_error(exc, url)}; {left} spooled {files} left in place for "
        "the next fedpneumo sync"
    )


def _tracking_engine(url: str) -> Engine:
    """Return the engine of an existing tracking database, never creating one."""
    if backend_of(url) == "sqlite":
        path = check_sqlite_path(normalize_url(url), create_folder=False)
        if path is None or not path.is_file():
            what = "is in memory" if path is None else "does not exist"
            if path is not None and path.exists():
                what = "is not a file"
            raise DatabaseError(
                f"database {mask_url(url)} {what}; spooled entries belong in the "
                "tracking database their runs were recorded in: give it with "
                "--db (or DATABASE_URL), e.g. --db sqlite:///path/to/fedpneumo.db"
            )
    engine = get_engine(url)
    with engine.connect() as conn:  # unreachable, not a database: DBAPIError
        tracked = inspect(conn).has_table(Run.__tablename__)
    if not tracked:
        raise DatabaseError(
            f"database {mask_url(url)} has no fedpneumo runs table; give the "
            "tracking database the runs were recorded in with --db (or DATABASE_URL)"
        )
    return engine


def _refused_for_good(exc: BaseException) -> bool:
    """Return True when an entry, not the database, is at fault."""
    if isinstance(exc, DatabaseError):
        return False  # ours: the database failed (InputErrors are the entry's)
    if isinstance(exc, InputError | IntegrityError | DataError):
        # A run that does not exist, a foreign key, a value out of range.
        return True
    if isinstance(exc, DBAPIError):
        return False  # unreachable, full, read-only: the next sync may work
    # Parameters SQLAlchemy could not convert, and what apply_entry raises on
    # fields it did not expect.
    return isinstance(
        exc, StatementError | ValueError | TypeError | KeyError | AttributeError
    ) or isinstance(exc, OverflowError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BadEntry | InputError):
        return str(exc)
    if isinstance(exc, StatementError) and exc.orig is not None:
        exc = exc.orig  # the driver's own words, without SQL and parameters
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _reject(path: Path, reason: str) -> None:
    """Move a spool file aside to ``rejected/`` so it stops blocking the spool."""
    target = path.parent.parent / REJECTED_DIRNAME
    try:
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a folder")
        target.mkdir(exist_ok=True)
        path.replace(target / path.name)
    except OSError as exc:
        log.error(
            "rejected %s: %s; it stays in the spool: cannot move it to %s (%s)",
            path,
            reason,
            target,
            exc.strerror or exc,
        )
        return
    log.error("rejected %s: %s; moved to %s", path, reason, target)


def _read_entry(path: Path) -> dict[str, Any] | None:
    """Return a spool file's entry, None if it is gone, or raise BadEntry."""
    if path.exists() and not path.is_file():
        # A folder or a FIFO: reading would fail, or block for ever.
        raise BadEntry("it is not a regular file")
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadEntry(f"it cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:
        raise BadEntry(f"it is not JSON ({str(exc).splitlines()[0]})") from None
    check_entry(entry)
    return entry


# The fields of each kind of entry: name -> (required, allowed JSON types).
