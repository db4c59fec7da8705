"""`fedpneumo runs ...`: read-only views of tracked runs."""

import typer

runs_app = typer.Typer(
    help="List, show, compare, plot and export runs.", no_args_is_help=True
)
