"""Flower deployment (not simulation): a SuperLink, SuperNodes and a submitter.

docker-compose runs this topology in containers (see ``docker-compose.yml``);
the test suite runs the same processes natively on loopback. ``submit`` (``python -m
fedpneumo.deploy submit``) sends one session to a SuperLink, streams its logs
and exits non-zero unless Flower reports the run completed: ``flwr run``
itself exits 0 when a run fails.

With ``--isolation subprocess`` the SuperLink and every SuperNode start their
own ``flower-superexec``; the ServerApp then runs with the SuperLink's
environment (DATABASE_URL) and each ClientApp with its SuperNode's (none).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedpneumo.flower import (
    APP_DIR,
    FlowerOutcome,
    flower_env,
    run_args,
    stream_run,
    toml_string,
    wait_healthy,
    write_connection,
)

log = logging.getLogger(__name__)

CONNECTION = "fedpneumo-deploy"


def node_config(
    partition_id: int,
    num_partitions: int,
    data_path: str | None = None,
    outputs_dir: str | None = None,
) -> str:
    """Return a SuperNode's ``--node-config`` (TOML values: strings quoted)."""
    parts = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if data_path:
        parts.append(f"data-path={toml_string(data_path)}")
    if outputs_dir:
        parts.append(f"outputs-dir={toml_string(outputs_dir)}")
    return " ".join(parts)


def echo_line(line: str) -> None:
    """Write one streamed log line to stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def submit(
    address: str,
    overrides: Sequence[str],
    *,
    app_dir: Path = APP_DIR,
    home: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> FlowerOutcome:
    """Run one session on a deployed SuperLink to its end; return Flower's verdict.

    Args:
        address: The SuperLink's ``host:port``.
        overrides: Hydra overrides, joined into the ``overrides`` run config.
        app_dir: The Flower app to build and submit.
        home: FLWR_HOME for the CLI (default: a temporary folder).
        on_line: Receives every streamed log line (default: stdout).
        env: Environment of the ``flwr`` CLI (default: this process's).
    """
    own_home = home is None
    home = Path(tempfile.mkdtemp(prefix="fedpneumo-submit-")) if home is None else home
    write_connection(home, CONNECTION, address)
    cli_env = flower_env(env if env is not None else os.environ, home)
    args = run_args(app_dir, CONNECTION, {"overrides": shlex.join(overrides)})
    try:
        return stream_run(
            args, env=cli_env, connection=CONNECTION, on_line=on_line or echo_line
        )
    finally:
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedpneumo.deploy submit``: submit a session, exit with its status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedpneumo.deploy",
        description="Submit a federated session to a deployed Flower SuperLink.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("submit", help="run one session; exit 0 iff it completed")
    cmd.add_argument("--superlink", required=True, help="SuperLink host:port")
    cmd.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder")
    cmd.add_argument("--wait-s", type=float, default=120.0, help="wait for /health")
    cmd.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    wait_healthy(args.superlink, timeout_s=args.wait_s)
    outcome = submit(
        args.superlink,
        args.overrides,
        app_dir=args.app,
    )
    if outcome.completed:
        log.info("Flower run %s completed", outcome.flwr_run_id)
        return 0
    log.error(
        "Flower run %s ended %s: %s",
        outcome.flwr_run_id,
        outcome.status,
        outcome.details,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
