"""The ``fedpneumo`` command line."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console

from fedpneumo.config import ConfigError

app = typer.Typer(
    help="Federated pneumonia detection with Flower, tracked in SQL.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
db_app = typer.Typer(help="Manage the tracking database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
log = logging.getLogger("fedpneumo")

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL (default: $DATABASE_URL, else outputs/fedpneumo.db).",
        show_default=False,
    ),
]


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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types whose message is the whole story for users."""
    from client_app.data import DataError
    from persistence.db import DatabaseError
    from persistence.repositories import RunNotFoundError

    return (ConfigError, DataError, DatabaseError, RunNotFoundError)


def main() -> None:
    """Run the CLI; known user errors exit non-zero with a one-line message."""
    try:
        app()
    except _user_errors() as exc:
        # One plain line, never wrapped: scripts and users grep for it.
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
