"""Structured event lines of the ServerApp: emit, emit_round, parse_event."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server_app.events import PREFIX, ROUND_EVALUATED, emit, emit_round, parse_event

EventLines = Callable[[], list[str]]


@pytest.fixture
def event_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> EventLines:
    # federation.setup_logging stops server_app's loggers from propagating;
    # make sure these tests see the records whatever ran before them.
    monkeypatch.setattr(logging.getLogger("server_app"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("server_app.events"), "propagate", True)
    caplog.set_level(logging.INFO, logger="server_app.events")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "server_app.events"]

    return lines


def test_emit_writes_one_prefixed_json_info_line(
    event_lines: EventLines, caplog: pytest.LogCaptureFixture
) -> None:
    emit("run_started", run_id=7, strategy="fedavg")
    lines = event_lines()
    assert len(lines) == 1
    assert lines[0].startswith(PREFIX)
    assert json.loads(lines[0][len(PREFIX) :]) == {
        "event": "run_started",
        "run_id": 7,
        "strategy": "fedavg",
    }
    assert caplog.records[-1].levelno == logging.INFO


def test_emit_turns_values_json_cannot_hold_into_text(
    event_lines: EventLines,
) -> None:
    emit("checkpoint", path=Path("/tmp/best.pt"))
    assert parse_event(event_lines()[0]) == {
        "event": "checkpoint",
        "path": "/tmp/best.pt",
    }


def test_emit_round_keeps_only_finite_numbers(event_lines: EventLines) -> None:
    metrics: dict[str, Any] = {
        "auroc": 0.91,
        "loss": math.nan,
        "threshold": math.inf,
        "num_samples": 120,
        "note": "text is not a metric",
    }
    emit_round(3, 5, metrics)
    lines = event_lines()
    assert len(lines) == 1
    assert parse_event(lines[0]) == {
        "event": ROUND_EVALUATED,
        "round": 3,
        "total": 5,
        "metrics": {"auroc": 0.91, "num_samples": 120.0},
    }
    # The line itself is strict JSON: no NaN or Infinity literals.
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]


def test_parse_event_finds_the_prefix_inside_a_log_line() -> None:
    body = json.dumps({"event": ROUND_EVALUATED, "round": 1, "total": 2})
    line = f"INFO server_app.events: {PREFIX}{body}"
    assert parse_event(line) == {"event": ROUND_EVALUATED, "round": 1, "total": 2}


@pytest.mark.parametrize(
    "line",
    [
        "",
        "INFO flwr: [ROUND 1/5]",
        "round_evaluated {'event': 'x'}",
        f"{PREFIX}not json at all",
        PREFIX + '{"event": "cut',
        PREFIX + '{"round": 1}',  # an object without an event name
        PREFIX + '["event", "round_evaluated"]',
        PREFIX + "42",
    ],
)
def test_parse_event_gives_none_for_other_lines(line: str) -> None:
    assert parse_event(line) is None


def test_emitted_lines_parse_back_in_order(event_lines: EventLines) -> None:
    emit_round(1, 2, {"auroc": 0.5})
    emit("run_finished", status="completed")
    events = [parse_event(line) for line in event_lines()]
    assert [e["event"] if e else None for e in events] == [
        ROUND_EVALUATED,
        "run_finished",
    ]
