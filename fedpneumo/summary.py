"""Run summaries printed at the end of ``fedpneumo train`` and ``fedpneumo run``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from persistence.db import mask_url

HEADLINE = ("auroc", "accuracy", "precision", "recall", "f1_score", "loss")


def fmt(value: Any, digits: int = 4) -> str:
    """Format a number for a table (blank for None, 'nan' for NaN)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def print_metrics(console: Console, metrics: Mapping[str, float], title: str) -> None:
    """Print one set of metrics as a two-column table."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, fmt(value))
    console.print(table)


def print_centralized_summary(console: Console, result: Any, url: str) -> None:
    """Print the outcome of a centralized run."""
    summary = result.fit.summary
    table = Table(title=f"centralized run {result.run_id}: completed")
    table.add_column("split")
    for key in HEADLINE:
        table.add_column(key, justify="right")
    for split in ("val", "test"):
        if f"final_{split}_auroc" in summary:
            table.add_row(
                split, *(fmt(summary.get(f"final_{split}_{k}")) for k in HEADLINE)
            )
    console.print(table)
    console.print(
        f"best epoch {summary.get('best_epoch')} of {len(result.fit.history)}, "
        f"decision threshold {fmt(summary.get('threshold'))} (chosen on val)"
    )
    console.print(f"checkpoint: {summary.get('checkpoint_path')}")
    console.print(f"metrics:    {result.save_dir}")
    console.print(f"database:   {mask_url(url)}")
