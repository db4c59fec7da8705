"""`fedpneumo runs ...`: read-only views of tracked runs."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedpneumo.reports import ClientReport, CurvePoint, RunReport

runs_app = typer.Typer(
    help="List, show, compare, plot and export runs (read-only).",
    rich_markup_mode=None,
    no_args_is_help=True,
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL (default: $DATABASE_URL, else outputs/fedpneumo.db).",
        show_default=False,
    ),
]
# Piped output gets wide tables: a wrapped cell breaks grep and scripts.
PIPE_WIDTH = 200
CURVE_COLUMNS = (
    ("train_loss", "train loss"),
    ("loss", "val loss"),
    ("accuracy", "val accuracy"),
    ("auroc", "val AUROC"),
    ("f1_score", "val F1"),
    ("precision", "val precision"),
    ("recall", "val recall"),
)


class ExportFormat(StrEnum):
    """File formats of ``runs export``."""

    csv = "csv"
    json = "json"


def make_console() -> Console:
    """Return a console for tables; piped output is wide so rows never wrap."""
    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=PIPE_WIDTH)


def _url(db: str | None) -> str:
    from persistence.db import default_database_url

    return db or default_database_url()


def fmt_duration(seconds: float | None) -> str:
    """Format seconds as ``12.3s``, ``4m05s`` or ``2h07m``."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


def fmt_rounds(report: RunReport) -> str:
    """Format progress as ``done/planned`` rounds (federated) or epochs."""
    if report.rounds_planned is None:
        return str(report.rounds_done)
    return f"{report.rounds_done}/{report.rounds_planned}"


def step_name(report: RunReport) -> str:
    """Return ``round`` for federated runs and ``epoch`` for centralized ones."""
    return "round" if report.mode == "federated" else "epoch"


def _point(point: CurvePoint | None, key: str) -> str:
    from fedpneumo.summary import fmt

    return fmt(None if point is None else getattr(point, key))


@runs_app.command("list")
def list_runs(
    experiment: Annotated[
        str | None, typer.Option(help="Only the runs of this experiment.")
    ] = None,
    db: DbOption = None,
) -> None:
    """List runs: status (stale = dead in-progress), progress, best val AUROC."""
    from fedpneumo.reports import load_runs, read_session
    from persistence.db import mask_url

    url = _url(db)
    with read_session(url) as session:
        reports = load_runs(session, experiment=experiment)
    console = make_console()
    if not reports:
        where = f" in experiment {experiment!r}" if experiment else ""
        console.print(f"no runs{where} in {mask_url(url)}", markup=False)
        return
    table = Table(title=f"runs in {mask_url(url)}")
    for name in ("id", "experiment", "mode", "strategy", "partition", "status"):
        table.add_column(name)
    for name in ("rounds", "best val AUROC", "accuracy", "at", "duration"):
        table.add_column(name, justify="right")
    for r in reports:
        best = r.best
        table.add_row(
            str(r.id),
            r.experiment,
            r.mode,
            r.strategy or "-",
            r.partition or "-",
            r.status,
            fmt_rounds(r),
            _point(best, "auroc"),
            _point(best, "accuracy"),
            "-" if best is None else f"{step_name(r)} {best.step}",
            fmt_duration(r.duration_s),
        )
    console.print(table)


@runs_app.command("show")
def show(
    run_id: Annotated[int, typer.Argument(help="The run's id.")],
    db: DbOption = None,
) -> None:
    """Show a run: details, config, validation per round/epoch, clients."""
    from fedpneumo.reports import load_clients, load_failures, load_runs, read_session

    with read_session(_url(db)) as session:
        (report,) = load_runs(session, [run_id])
        clients = load_clients(session, [run_id])[run_id]
        failures = load_failures(session, run_id)
    console = make_console()
    console.print(_details_table(report))
    console.rule("config")
    if report.config:
        console.print_json(data=report.config)
    else:
        console.print("no config recorded")
    console.print(_curve_table(report))
    if report.mode == "federated":
        console.print(_clients_table(clients))
        console.print(_failures_table(failures))


def _details_table(r: RunReport) -> Table:
    c = r.columns
    table = Table(title=f"run {r.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    host = f"{c['host']} pid {c['pid']}" if c.get("host") else None
    rows = {
        "experiment": r.experiment,
        "mode": r.mode,
        "status": r.status,
        "strategy": r.strategy,
        "partition": r.partition,
        "seed": c.get("seed"),
        f"{step_name(r)}s": fmt_rounds(r),
        "started": c.get("start_time"),
        "ended": c.get("end_time"),
        "duration": fmt_duration(r.duration_s),
        "flower run id": c.get("flwr_run_id"),
        "host": host,
        "outputs": c.get("outputs_path"),
        "checkpoint": c.get("checkpoint_path"),
        "final model": c.get("final_model_path"),
        "error": c.get("error_message"),
    }
    for key, value in rows.items():
        table.add_row(key, "-" if value is None else str(value))
    return table


def _curve_table(r: RunReport) -> Table:
    title = (
        "server evaluation on val, per round (round 0 = initial model)"
        if r.mode == "federated"
        else "validation per epoch"
    )
    table = Table(title=f"run {r.id}: {title}")
    table.add_column(step_name(r), justify="right")
    for _, header in CURVE_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("best")
    best = r.best
    for p in r.curve:
        cells = [_point(p, key) for key, _ in CURVE_COLUMNS]
        table.add_row(str(p.step), *cells, "*" if p is best else "")
    return table


def _clients_table(clients: list[ClientReport]) -> Table:
    from fedpneumo.summary import fmt

    table = Table(title="clients (train loss and val AUROC: last local epoch)")
    table.add_column("client")
    for name in ("partition", "examples", "rounds trained", "last round"):
        table.add_column(name, justify="right")
    for name in ("train loss", "val AUROC", "failures"):
        table.add_column(name, justify="right")
    for c in clients:
        last = c.last_round
        table.add_row(
            c.identifier,
            fmt(c.partition_id),
            fmt(c.num_examples),
            str(len(c.train_losses)),
            fmt(last),
            fmt(c.train_losses.get(last) if last is not None else None),
            fmt(c.val_aurocs.get(last) if last is not None else None),
            str(c.failures),
        )
    return table


def _failures_table(failures: list[dict[str, Any]]) -> Table:
    table = Table(title=f"client failures: {len(failures)}")
    for name in ("round", "client", "node id", "reason"):
        table.add_column(name)
    for f in failures:
        table.add_row(
            str(f["round_number"]),
            f["client_identifier"] or "-",
            f["node_id"],
            f["reason"],
        )
    return table


@runs_app.command("compare")
def compare(
    run_ids: Annotated[list[int], typer.Argument(help="Two or more run ids.")],
    db: DbOption = None,
) -> None:
    """Compare runs side by side: best and final val metrics, config differences.

    Best is the round/epoch with the highest val AUROC; final is the last one.
    """
    from fedpneumo.reports import MISSING, config_differences, load_runs, read_session

    if len(run_ids) < 2:
        raise typer.BadParameter("give at least two run ids", param_hint="RUN_IDS")
    with read_session(_url(db)) as session:
        reports = load_runs(session, run_ids)
    table = Table(title="runs compared (val metrics)")
    table.add_column("")
    for r in reports:
        table.add_column(f"run {r.id}", justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("mode", [r.mode for r in reports]),
        ("strategy", [r.strategy or "-" for r in reports]),
        ("partition", [r.partition or "-" for r in reports]),
        ("status", [r.status for r in reports]),
        ("rounds / epochs", [fmt_rounds(r) for r in reports]),
        ("duration", [fmt_duration(r.duration_s) for r in reports]),
    ]
    for which in ("best", "final"):
        points = [getattr(r, which) for r in reports]
        rows.append((f"{which} round / epoch", [_step(p) for p in points]))
        for key, header in CURVE_COLUMNS:
            rows.append((f"{which} {header}", [_point(p, key) for p in points]))
    for name, cells in rows:
        table.add_row(name, *cells)
    console = make_console()
    console.print(table)
    diffs = config_differences([r.config for r in reports])
    config = Table(title=f"config differences: {len(diffs)} keys")
    config.add_column("key")
    for r in reports:
        config.add_column(f"run {r.id}", overflow="fold")
    for key, values in diffs.items():
        config.add_row(key, *("(absent)" if v is MISSING else _json(v) for v in values))
    console.print(config)


def _step(point: CurvePoint | None) -> str:
    return "-" if point is None else str(point.step)


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@runs_app.command("plot")
def plot(
    run_ids: Annotated[list[int], typer.Argument(help="One or more run ids.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="PNG file to write (1200x800 px).")
    ],
    db: DbOption = None,
) -> None:
    """Plot learning curves: val AUROC, accuracy, loss and client train loss.

    Runs share the axes; centralized runs are dashed, against epochs.
    """
    from fedpneumo.plots import plot_runs
    from fedpneumo.reports import load_clients, load_runs, read_session

    if not output.parent.is_dir():
        raise typer.BadParameter(
            f"folder {output.parent} does not exist", param_hint="--output"
        )
    with read_session(_url(db)) as session:
        reports = load_runs(session, run_ids)
        clients = load_clients(session, run_ids)
    plot_runs(reports, clients, output)
    make_console().print(f"wrote {output}", markup=False)


@runs_app.command("export")
def export(
    run_id: Annotated[int, typer.Argument(help="The run's id.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="csv or json.")
    ] = ExportFormat.json,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File (default: stdout).")
    ] = None,
    db: DbOption = None,
) -> None:
    """Export a run with its clients, server evaluations, metrics and failures.

    JSON: one object {"run": {...}, "clients": [...], "server_evaluations":
    [...], "metrics": [...], "client_failures": [...]}, each row with every
    column of its table; times are ISO 8601 (UTC), NaN is null (is_nan says
    which).

    CSV: one long table. The first column, "table", names each row's table
    (runs, clients, server_evaluations, run_metrics, client_failures); the
    other columns are the union of those tables' columns, in that order,
    empty where the row's table lacks the column or the value is NULL.
    Floats keep full precision, booleans are true/false, runs.config is JSON.
    """
    from fedpneumo.export import csv_text, export_run, json_text
    from fedpneumo.reports import read_session

    with read_session(_url(db)) as session:
        tables = export_run(session, run_id)
    text = json_text(tables) if fmt is ExportFormat.json else csv_text(tables)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        make_console().print(f"wrote {output}", markup=False)
