"""`fedpneumo runs ...`: read-only views of tracked runs."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedpneumo.tables import (
    CURVE_COLUMNS,
    clients_table,
    curve_table,
    details_table,
    epsilon_cell,
    failures_table,
    fmt_duration,
    fmt_rounds,
    hospitals_table,
    make_console,
    mode_cell,
    point_cell,
    privacy_line,
    spread_line,
    step_name,
    test_line,
)

if TYPE_CHECKING:
    from fedpneumo.reports import CurvePoint

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


def check_run_ids(value: Any) -> Any:
    """Reject run ids no database can hold, as unknown runs (exit 2).

    A Typer callback for run-id arguments (one id or a list): SQLite cannot
    even look up an id past 64 bits, so without this it raises OverflowError.
    """
    from persistence.errors import RunNotFoundError
    from persistence.repositories import MAX_ID

    for run_id in value if isinstance(value, list) else [value]:
        if run_id is not None and not 1 <= run_id <= MAX_ID:
            raise RunNotFoundError(run_id)
    return value


RunId = Annotated[int, typer.Argument(help="The run's id.", callback=check_run_ids)]


class ExportFormat(StrEnum):
    """File formats of ``runs export``."""

    csv = "csv"
    json = "json"


def _url(db: str | None) -> str:
    from persistence.db import default_database_url

    return db or default_database_url()


@runs_app.command("list")
def list_runs(
    experiment: Annotated[
        str | None, typer.Option(help="Only the runs of this experiment.")
    ] = None,
    db: DbOption = None,
) -> None:
    """List runs: status (stale = dead in-progress), progress, best val AUROC.

    Runs on generated toy data show ``(synthetic)`` after their mode.
    """
    from fedpneumo.reports import load_runs
    from persistence.db import mask_url
    from persistence.readonly import read_session

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
    for name in ("rounds", "best val AUROC", "accuracy", "at", "epsilon", "duration"):
        table.add_column(name, justify="right")
    for r in reports:
        best = r.best
        table.add_row(
            str(r.id),
            r.experiment,
            mode_cell(r),
            r.strategy or "-",
            r.partition or "-",
            r.status,
            fmt_rounds(r),
            point_cell(best, "auroc"),
            point_cell(best, "accuracy"),
            "-" if best is None else f"{step_name(r)} {best.step}",
            epsilon_cell(r.final_epsilon),
            fmt_duration(r.duration_s),
        )
    console.print(table)


@runs_app.command("show")
def show(
    run_id: RunId,
    db: DbOption = None,
) -> None:
    """Show a run: details, config, validation per round/epoch, clients.

    Federated runs also show each hospital's score of the best and the last
    round's global model with the worst hospital; every run shows its
    end-of-run test score, or says that nothing is claimed about test.
    """
    from fedpneumo.reports import load_clients, load_failures, load_runs
    from persistence.readonly import read_session

    with read_session(_url(db)) as session:
        (report,) = load_runs(session, [run_id])
        clients = load_clients(session, [run_id])[run_id]
        failures = load_failures(session, run_id)
    console = make_console()
    console.print(details_table(report))
    console.rule("config")
    if report.config:
        console.print_json(data=report.config)
    else:
        console.print("no config recorded")
    console.print(curve_table(report))
    line = privacy_line(report)
    if line:
        console.print(line, markup=False)
    if report.mode == "federated":
        print_hospitals(console, report)
        console.print(clients_table(clients))
        console.print(failures_table(failures))
    console.print(test_line(report), markup=False)


def print_hospitals(console: Any, report: Any) -> None:
    """Print each hospital's score and the worst one, for the best and last round."""
    from fedpneumo.reports import hospital_spread

    if not report.hospitals:
        console.print(
            "hospitals: no per-hospital evaluation recorded (evaluation.federated)",
            markup=False,
        )
        return
    shown: dict[int, str] = {}
    points = ((report.best, "best (highest val AUROC)"), (report.final, "last"))
    for point, what in points:
        if point is not None:
            shown.setdefault(point.step, what)
    for step, what in shown.items():
        scores = report.hospitals.get(step)
        if scores:
            console.print(hospitals_table(report.id, step, what, scores))
            console.print(spread_line(hospital_spread(step, scores)), markup=False)
        elif step == 0:
            console.print(
                f"round 0 ({what}) is the initial model: only the server scores it",
                markup=False,
            )
        else:
            console.print(
                f"hospitals did not evaluate round {step} ({what}): see "
                "evaluation.every and evaluation.fraction",
                markup=False,
            )


@runs_app.command("compare")
def compare(
    run_ids: Annotated[
        list[int], typer.Argument(help="Two or more run ids.", callback=check_run_ids)
    ],
    db: DbOption = None,
) -> None:
    """Compare runs side by side: best and final val metrics, config differences.

    Each "best" metric is that metric's own best over all rounds/epochs: the
    lowest for losses, the highest for the others. "best-AUROC round / epoch"
    is the one with the highest val AUROC (the model a run keeps); final is
    the last one.
    """
    from fedpneumo.reports import MISSING, config_differences, load_runs
    from fedpneumo.summary import fmt
    from persistence.readonly import read_session

    if len(run_ids) < 2:
        raise typer.BadParameter("give at least two run ids", param_hint="RUN_IDS")
    with read_session(_url(db)) as session:
        reports = load_runs(session, run_ids)
    table = Table(title="runs compared (val metrics)")
    table.add_column("")
    for r in reports:
        table.add_column(f"run {r.id}", justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("mode", [mode_cell(r) for r in reports]),
        ("strategy", [r.strategy or "-" for r in reports]),
        ("partition", [r.partition or "-" for r in reports]),
        ("status", [r.status for r in reports]),
        ("privacy", [r.privacy or "none" for r in reports]),
        ("rounds / epochs", [fmt_rounds(r) for r in reports]),
        ("duration", [fmt_duration(r.duration_s) for r in reports]),
    ]
    rows.append(("best-AUROC round / epoch", [_step(r.best) for r in reports]))
    for key, header in CURVE_COLUMNS:
        # Each metric's own best: the loss at the best-AUROC round is not
        # the best loss, and a column called best must not say otherwise.
        best = [point_cell(r.best_of(key), key) for r in reports]
        rows.append((f"best {header}", best))
    finals = [r.final for r in reports]
    rows.append(("final round / epoch", [_step(p) for p in finals]))
    for key, header in CURVE_COLUMNS:
        rows.append((f"final {header}", [point_cell(p, key) for p in finals]))
    # Federated runs: the worst hospital's score of the kept and last model.
    for which, points in (("best-AUROC", [r.best for r in reports]), ("final", finals)):
        for key, header in (("auroc", "AUROC"), ("accuracy", "accuracy")):
            cells = [
                fmt(r.lowest_hospital(p, key)) if r.mode == "federated" else "-"
                for r, p in zip(reports, points, strict=True)
            ]
            rows.append((f"worst hospital {header} ({which} round)", cells))
    rows.append(
        (
            "final epsilon",
            [epsilon_cell(r.final_epsilon) for r in reports],
        )
    )
    # Scored once at the end on the test split, never used to pick anything.
    for key, header in (("auroc", "AUROC"), ("accuracy", "accuracy")):
        cells = [fmt(getattr(r.test, key)) if r.test else "-" for r in reports]
        rows.append((f"test {header} (not used for selection)", cells))
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
    run_ids: Annotated[
        list[int], typer.Argument(help="One or more run ids.", callback=check_run_ids)
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Image file to write (1200x1100 px); its extension picks the "
            "format: .png, .pdf, .svg, ... (any that matplotlib's Agg writes).",
        ),
    ],
    db: DbOption = None,
) -> None:
    """Plot learning curves: val AUROC, accuracy, loss, train loss, hospital AUROC.

    The hospital panel has one thin line per hospital: its AUROC of each
    round's global model on its held-out slice. Runs share the axes;
    centralized runs are dashed, against epochs. The legend names each run
    with the config keys that differ between the runs.
    """
    from fedpneumo.plots import check_plot_path, plot_runs
    from fedpneumo.reports import load_clients, load_runs
    from persistence.readonly import read_session

    # Before reading the database: a bad path fails at once.
    check_plot_path(output)
    with read_session(_url(db)) as session:
        reports = load_runs(session, run_ids)
        clients = load_clients(session, run_ids)
    plot_runs(reports, clients, output)
    make_console().print(f"wrote {output}", markup=False)


@runs_app.command("export")
def export(
    run_id: RunId,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="csv or json.")
    ] = ExportFormat.json,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File (default: stdout).")
    ] = None,
    db: DbOption = None,
) -> None:
    """Export a run with its clients, evaluations, metrics and failures.

    JSON: one object {"run": {...}, "clients": [...], "server_evaluations":
    [...], "metrics": [...], "client_failures": [...], "client_evaluations":
    [...], "test_evaluations": [...], "privacy_spent": [...]}, each row with
    every column of its table; times are ISO 8601 (UTC), NaN is null (is_nan
    says which); a hospital's AUROC is null where its slice holds one class.

    CSV: one long table. The first column, "table", names each row's table
    (runs, clients, server_evaluations, run_metrics, client_failures,
    client_evaluations, test_evaluations, privacy_spent); the
    other columns are the union of those tables' columns, in that order,
    empty where the row's table lacks the column or the value is NULL.
    Floats keep full precision, booleans are true/false, runs.config is JSON.

    The output's folder must exist; the file is written whole or not at all.
    """
    from fedpneumo.export import csv_text, export_run, json_text
    from fedpneumo.output_files import check_output_folder, write_atomically
    from persistence.readonly import read_session

    if output is not None:
        check_output_folder(output)  # before reading: a bad path fails at once
    with read_session(_url(db)) as session:
        tables = export_run(session, run_id)
    text = json_text(tables) if fmt is ExportFormat.json else csv_text(tables)
    if output is None:
        sys.stdout.write(text)
    else:
        data = text.encode("utf-8")
        write_atomically(output, lambda fh: fh.write(data))
        make_console().print(f"wrote {output}", markup=False)
