"""The one exception hierarchy; each class carries the CLI's exit code.

Every layer raises a subclass of these (``ConfigError`` in the server's config,
``DataError`` in the client's data loading, ...), and the CLI maps any of them
to one ``error: ...`` line and ``exit_code``, as the README's table says.
Ctrl-C exits 130 (128 + SIGINT), as Typer does for an interrupted command.
"""

from __future__ import annotations


class FedPneumoError(Exception):
    """An error whose message is the whole story for the user."""

    exit_code = 1


class InputError(FedPneumoError, ValueError):
    """Bad input: configuration, data or command arguments (exit code 2)."""

    exit_code = 2


class FailedRunError(FedPneumoError, RuntimeError):
    """A run or an operation that failed at run time (exit code 1)."""

    exit_code = 1


class DatabaseError(FailedRunError):
    """The tracking database is unreachable or refuses us; password masked."""


class RunNotFoundError(InputError, LookupError):
    """A run id that has no row in ``runs``."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} does not exist")
        self.run_id = run_id
