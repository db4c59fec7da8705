"""Live progress for long work: a rich bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


class ProgressReporter:
    """Report ``unit x/N`` with the latest metrics, elapsed time and ETA."""

    def __init__(self, unit: str, total: int, *, start: int = 0) -> None:
        self.unit = unit
        self.total = total
        self.done = start
        self.started = time.monotonic()
        self._start = start
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        if sys.stderr.isatty():
            self._progress = Progress(
                TextColumn(f"[bold]{self.unit}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
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
        text = describe(metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=index, metrics=text)
            return
        elapsed = time.monotonic() - self.started
        finished = max(index - self._start, 1)
        eta = elapsed / finished * (self.total - index)
        log.info(
            "%s %d/%d %s elapsed=%.0fs eta=%.0fs",
            self.unit,
            index,
            self.total,
            text,
            elapsed,
            eta,
        )
