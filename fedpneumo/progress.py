"""Live progress for long work: a rich bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)

SHOWN = ("val_auroc", "val_accuracy", "val_loss", "train_loss", "auroc", "accuracy")


def describe(metrics: Mapping[str, Any]) -> str:
    """Return the headline metrics as ``name=value`` pairs."""
    parts = []
    for key in SHOWN:
        value = metrics.get(key)
        if isinstance(value, int | float):
            parts.append(f"{key}={value:.4f}")
    return " ".join(parts)


def fmt_eta(seconds: float) -> str:
    """Format an ETA as ``0:04:05`` (hours:minutes:seconds)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class EtaEstimator:
    """Estimate the time left from the pace of the units after the first.

    The first unit to complete also carries the start-up (Flower, Ray, data
    loading, the initial evaluation), which can dwarf a round: the pace is
    measured from that first completion onward, so there is no estimate
    until a second unit has completed.
    """

    def __init__(
        self, total: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.clock = clock
        self._first: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None

    def mark(self, index: int) -> None:
        """Note that unit number ``index`` has just completed."""
        now = self.clock()
        if self._first is None:
            self._first = (now, index)
        self._last = (now, index)

    def seconds_per_unit(self) -> float | None:
        """Return the pace since the first completed unit, or None while unknown."""
        if self._first is None or self._last is None:
            return None
        (t0, i0), (t1, i1) = self._first, self._last
        if i1 <= i0:
            return None
        return (t1 - t0) / (i1 - i0)

    def eta(self) -> float | None:
        """Return the seconds left (counting down between units), or None."""
        pace = self.seconds_per_unit()
        if pace is None or self._last is None:
            return None
        last_time, last_index = self._last
        left = pace * max(self.total - last_index, 0)
        return max(left - (self.clock() - last_time), 0.0)


class EtaColumn(ProgressColumn):
    """A progress bar column showing an EtaEstimator's ETA (``eta -`` until known)."""

    def __init__(self, estimator: EtaEstimator) -> None:
        super().__init__()
        self.estimator = estimator

    def render(self, task: Task) -> Text:
        """Return ``eta H:MM:SS``, or ``eta -`` while it cannot be estimated."""
        eta = self.estimator.eta()
        return Text("eta " + ("-" if eta is None else fmt_eta(eta)))


class ProgressReporter:
    """Report ``unit x/N`` with the latest metrics, elapsed time and ETA.

    The ETA comes from ``EtaEstimator``: none until two units are done.
    ``clock`` (seconds, monotonic) is for tests.
    """

    def __init__(
        self,
        unit: str,
        total: int,
        *,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.total = total
        self.done = start
        self.clock = clock
        self.started = clock()
        self.estimator = EtaEstimator(total, clock=clock)
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        if sys.stderr.isatty():
            self._progress = Progress(
                TextColumn(f"[bold]{self.unit}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                EtaColumn(self.estimator),
                TextColumn("{task.fields[metrics]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.unit, total=self.total, completed=self.done, metrics=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, index: int, metrics: Mapping[str, Any]) -> None:
        """Mark ``unit`` number ``index`` as done with its metrics."""
        self.done = index
        self.estimator.mark(index)
        text = describe(metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=index, metrics=text)
            return
        elapsed = self.clock() - self.started
        eta = self.estimator.eta()
        log.info(
            "%s %d/%d %s elapsed=%.0fs%s",
            self.unit,
            index,
            self.total,
            text,
            elapsed,
            "" if eta is None else f" eta={eta:.0f}s",
        )
