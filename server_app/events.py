"""One structured line per event, for whoever follows a run's log stream.

The ServerApp's logs reach ``fedpneumo run`` only as text (``flwr run
--stream``); progress travels as one JSON object per line behind a fixed
prefix, so the launcher never parses human-readable log text.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "fedpneumo-event "
ROUND_EVALUATED = "round_evaluated"
# The tracking database became unreachable / reachable again.
TRACKING_DOWN = "tracking_down"
TRACKING_UP = "tracking_up"
# The run ended while the database was down: its rows and status are spooled.
TRACKING_PENDING = "tracking_pending"


def emit(event: str, **fields: Any) -> None:
    """Log one event as ``fedpneumo-event {"event": ..., ...}``."""
    log.info("%s%s", PREFIX, json.dumps({"event": event, **fields}, default=str))


def emit_round(round_number: int, total: int, metrics: Mapping[str, float]) -> None:
    """Announce that the global model of a round has been evaluated."""
    finite = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }
    emit(ROUND_EVALUATED, round=round_number, total=total, metrics=finite)


def parse_event(line: str) -> dict[str, Any] | None:
    """Return the event a log line carries, or None for any other line."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        event = json.loads(line[start + len(PREFIX) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
