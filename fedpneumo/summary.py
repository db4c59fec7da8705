"""Run summaries printed at the end of ``fedpneumo train`` and ``fedpneumo run``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from client_app.metric_keys import (
    FALSE_NEGATIVES,
    FALSE_POSITIVES,
    HEADLINE_KEYS,
    NUM_SAMPLES,
    TRUE_NEGATIVES,
    TRUE_POSITIVES,
)
from persistence.db import mask_url

HEADLINE = HEADLINE_KEYS
COUNT_KEYS = frozenset(
    {TRUE_POSITIVES, TRUE_NEGATIVES, FALSE_POSITIVES, FALSE_NEGATIVES, NUM_SAMPLES}
)
SYNTHETIC_NOTE = "data:       SYNTHETIC (generated toy images, not X-rays)"


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
        # Confusion counts and sample numbers are whole numbers.
        whole = key in COUNT_KEYS and float(value).is_integer()
        table.add_row(key, str(int(value)) if whole else fmt(value))
    console.print(table)


def print_centralized_summary(console: Console, result: Any, url: str) -> None:
    """Print the outcome of a centralized run."""
    summary = result.fit.summary
    synthetic = bool(getattr(result.data, "synthetic", False))
    tag = " on synthetic data" if synthetic else ""
    label = f"centralized run {result.run_id}" if url else "centralized training"
    table = Table(title=f"{label}: completed{tag}")
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
    if synthetic:
        console.print(SYNTHETIC_NOTE)
    console.print(f"checkpoint: {summary.get('checkpoint_path')}")
    console.print(f"metrics:    {result.save_dir}")
    console.print(
        f"database:   {mask_url(url) if url else 'none (tracking.enable_db=false)'}"
    )


def print_federated_summary(console: Console, outcome: Any) -> None:
    """Print the outcome of one federated session from the tracking database."""
    from sqlalchemy import select

    from persistence.db import get_engine, session_scope
    from persistence.models import Run, ServerEvaluation

    run = outcome.run
    flower = outcome.flower
    if run is None:
        console.print(
            f"Flower run {flower.flwr_run_id}: {flower.status} {flower.details}".strip()
        )
        return
    with session_scope(get_engine(outcome.url)) as db:
        run = db.get(Run, run.id)
        evals = db.scalars(
            select(ServerEvaluation)
            .where(ServerEvaluation.run_id == run.id)
            .order_by(ServerEvaluation.round_number)
        ).all()
        synthetic = (run.config or {}).get("synthetic") is True
        table = Table(
            title=f"federated run {run.id}: {run.status} "
            f"({run.strategy}, {run.partition}, {run.rounds_completed}/"
            f"{run.num_rounds} rounds)" + (" on synthetic data" if synthetic else "")
        )
        for col in ("round", "loss", "accuracy", "auroc", "f1_score", "threshold"):
            table.add_column(col, justify="right")
        for ev in evals:
            table.add_row(
                str(ev.round_number),
                fmt(ev.loss),
                fmt(ev.accuracy),
                fmt(ev.auroc),
                fmt(ev.f1_score),
                fmt(ev.threshold),
            )
        console.print(table)
        _print_hospitals_and_test(console, db, run.id)
        if synthetic:
            console.print(SYNTHETIC_NOTE)
        if run.error_message:
            console.print(f"error:      {run.error_message}", markup=False)
        console.print(f"flower run: {flower.flwr_run_id} ({flower.status})")
        console.print(f"best model: {run.checkpoint_path}")
        console.print(f"final:      {run.final_model_path}")
        console.print(f"outputs:    {run.outputs_path}")
        console.print(f"database:   {mask_url(outcome.url)}")


def _print_hospitals_and_test(console: Console, db: Any, run_id: int) -> None:
    """Print the worst hospital of the kept model's round and the test line."""
    from fedpneumo.reports import hospital_spread, load_runs
    from fedpneumo.tables import privacy_line, spread_line, test_line

    (report,) = load_runs(db, [run_id])
    line = privacy_line(report)
    if line:
        console.print(line, markup=False)
    stop = report.columns.get("stop_reason")
    if stop:
        console.print(f"stopped:    {stop}", markup=False)
    for point in (report.best, report.final):
        scores = report.hospitals.get(point.step) if point is not None else None
        if point is not None and scores:
            line = spread_line(hospital_spread(point.step, scores))
            console.print(line, markup=False)
            break
    console.print(test_line(report), markup=False)
