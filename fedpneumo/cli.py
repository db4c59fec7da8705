"""The ``fedpneumo`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedpneumo.flower import APP_DIR
from fedpneumo.runs_cli import DbOption, runs_app
from persistence.errors import FedPneumoError

app = typer.Typer(
    help="Federated pneumonia detection with Flower, tracked in SQL.",
    # Plain click messages: a usage error is one "Error: ..." line, no box.
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="Manage the tracking database schema.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(db_app, name="db")
app.add_typer(runs_app, name="runs")

console = Console()
log = logging.getLogger("fedpneumo")


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr, one line each."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs.")
    ] = False,
) -> None:
    setup_logging(verbose)


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None) -> None:
    """Create or migrate the tracking schema to the newest version."""
    from persistence.db import default_database_url, mask_url, upgrade_database

    url = db or default_database_url()
    before, after = upgrade_database(url)
    if before == after:
        console.print(f"{mask_url(url)}: schema already at {after}, nothing to do")
    else:
        console.print(
            f"{mask_url(url)}: schema upgraded {before or 'empty'} -> {after}"
        )


AppOption = Annotated[
    Path | None,
    typer.Option(
        "--app",
        help="Flower app folder to run (default: this project's, which a "
        "wrapper app may extend, e.g. with Flower mods).",
        show_default=False,
    ),
]
OVERRIDES_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Hydra overrides, e.g. train.epochs=5 model=resnet18"),
]


@app.command(context_settings=OVERRIDES_CONTEXT)
def train(overrides: Overrides = None) -> None:
    """Train a centralized baseline; select on val; record one centralized run."""
    from server_app.compose import database_url, load_config, resolve_paths
    from server_app.resources import check_outputs

    cfg = resolve_paths(load_config(overrides or []))
    check_outputs(cfg)
    # Imported once the config is valid: a typo fails before torch loads.
    from fedpneumo.centralized import run_centralized
    from fedpneumo.summary import print_centralized_summary

    result = run_centralized(cfg)
    print_centralized_summary(console, result, database_url(cfg))


@app.command(context_settings=OVERRIDES_CONTEXT)
def run(
    overrides: Overrides = None,
    multirun: Annotated[
        bool, typer.Option("--multirun", "-m", help="Sweep: one run per combination.")
    ] = False,
    flower_logs: Annotated[
        bool, typer.Option("--flower-logs", help="Echo Flower's own log lines.")
    ] = False,
    app_dir: AppOption = None,
) -> None:
    """Run a federated simulation (one Run per session) and print its summary."""
    from fedpneumo.federated import run_sessions
    from fedpneumo.summary import print_federated_summary

    outcomes = run_sessions(
        overrides or [], multirun=multirun, echo=flower_logs, app_dir=app_dir or APP_DIR
    )
    for outcome in outcomes:
        print_federated_summary(console, outcome)
    _exit_on_failures(outcomes)


@app.command()
def resume(
    run_id: Annotated[int, typer.Argument(help="The tracking database's run id.")],
    db: DbOption = None,
    outputs: Annotated[
        Path, typer.Option(help="Outputs folder holding the default SQLite file.")
    ] = Path("outputs"),
    force: Annotated[
        bool, typer.Option(help="Resume even if the run looks alive.")
    ] = False,
    app_dir: AppOption = None,
) -> None:
    """Continue a federated run from its last completed round."""
    from fedpneumo.federated import finish_if_done, resume_session
    from fedpneumo.summary import print_federated_summary
    from persistence.db import default_database_url

    url = db or default_database_url(outputs)
    done = finish_if_done(run_id, url)
    if done is not None:
        console.print(
            f"run {run_id} is completed ({done.rounds_completed}/{done.num_rounds} "
            "rounds): nothing left to resume"
        )
        return
    outcome = resume_session(
        run_id, url, echo=False, force=force, app_dir=app_dir or APP_DIR
    )
    print_federated_summary(console, outcome)
    _exit_on_failures([outcome])


def _exit_on_failures(outcomes: list) -> None:
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        sys.stderr.write(f"error: {o.problem()}\n")
    if failed:
        raise typer.Exit(1)


@app.command()
def sync(
    outputs: Annotated[
        Path, typer.Option(help="Outputs folder whose spools to replay.")
    ] = Path("outputs"),
    db: DbOption = None,
) -> None:
    """Write metric batches spooled while the database was unreachable."""
    from persistence.db import DatabaseError, default_database_url, describe_error
    from persistence.spool import is_transient
    from persistence.spool import sync as replay_spools

    if not outputs.is_dir():
        raise typer.BadParameter(f"{outputs} is not a folder", param_hint="--outputs")
    url = db or default_database_url(outputs)
    try:
        files, stored, rejected = replay_spools(url, outputs)
    except Exception as exc:
        if is_transient(exc):
            raise DatabaseError(describe_error(exc, url)) from None
        raise
    console.print(
        f"replayed {files} spooled batches: {stored} new rows, {rejected} rejected"
    )
    if rejected:
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="A saved model (best_model.pt).")],
    data: Annotated[str, typer.Option(help="A .npz file or Kermany image folder.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "val",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Evaluate a saved model on any supported data file or folder."""
    from fedpneumo.centralized import evaluate_checkpoint
    from fedpneumo.summary import print_metrics

    metrics = evaluate_checkpoint(checkpoint, data, split)
    if as_json:
        sys.stdout.write(json.dumps(metrics) + "\n")
    else:
        print_metrics(console, metrics, title=f"{checkpoint} on {split}")


def main() -> None:
    """Run the CLI; our errors exit with their code and a one-line message."""
    try:
        app()
    except FedPneumoError as exc:
        # One plain line, never wrapped: scripts and users grep for it.
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
