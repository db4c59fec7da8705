"""Read-only views of tracked runs: liveness, listings, comparisons."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from persistence.models import Run

DEFAULT_STALE_AFTER_S = 900.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(run: Run, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> bool:
    """Return True for an in-progress run whose owning process is gone.

    On the owner's host a dead pid decides at once; elsewhere the heartbeat
    must be older than ``stale_after_s``.
    """
    if run.status != "in_progress":
        return False
    if run.host == socket.gethostname() and run.pid and not _pid_alive(run.pid):
        return True
    beat = run.heartbeat_at or run.start_time
    return (datetime.now(UTC) - beat).total_seconds() > stale_after_s
