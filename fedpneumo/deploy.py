"""Flower deployment (not simulation): a SuperLink, SuperNodes and a submitter.

docker-compose runs this topology in containers (see ``docker-compose.yml``);
``NativeDeployment`` runs the same processes on loopback, for tests and for a
look at deployment mode without Docker. ``submit`` (``python -m
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
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedpneumo.launcher import (
    APP_DIR,
    STARTED,
    FlowerOutcome,
    flower_bin,
    flower_env,
    flower_status,
    kill_tree,
    toml_string,
    wait_healthy,
    write_connection,
)
from fedpneumo.pg_server import free_port

log = logging.getLogger(__name__)

CONNECTION = "fedpneumo-deploy"
# Variables that would hand a SuperNode (and so its ClientApps) the database.
DATABASE_ENV_PREFIXES = ("DATABASE_URL", "POSTGRES_", "PG")


def without_database(env: Mapping[str, str]) -> dict[str, str]:
    """Return the environment with every database variable removed."""
    return {
        k: v
        for k, v in env.items()
        if not any(k.startswith(p) for p in DATABASE_ENV_PREFIXES)
    }


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
    on_line = on_line or echo_line
    own_home = home is None
    home = Path(tempfile.mkdtemp(prefix="fedpneumo-submit-")) if home is None else home
    write_connection(home, CONNECTION, address)
    cli_env = flower_env(env if env is not None else os.environ, home)
    run_config = f"overrides={toml_string(shlex.join(overrides))}"
    args = [flower_bin("flwr"), "run", str(app_dir), CONNECTION]
    args += ["--run-config", run_config, "--stream"]
    proc = subprocess.Popen(
        args,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    try:
        run_id: int | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if run_id is None and (match := STARTED.search(line)):
                run_id = int(match.group(1))
            on_line(line.rstrip("\n"))
        returncode = proc.wait()
        if run_id is None:
            return FlowerOutcome(None, "not-started", "flwr run failed", returncode)
        status, details = flower_status(cli_env, CONNECTION, run_id)
        return FlowerOutcome(run_id, status, details, returncode)
    finally:
        if proc.poll() is None:  # interrupted: do not leave the CLI behind
            kill_tree(proc.pid)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


class NativeDeployment:
    """A SuperLink and SuperNodes as local processes on loopback.

    The SuperLink gets ``server_env`` (with DATABASE_URL for the ServerApp);
    the SuperNodes get ``node_env`` with every database variable removed.
    """

    def __init__(
        self,
        root: Path,
        *,
        num_nodes: int,
        server_env: Mapping[str, str],
        node_env: Mapping[str, str],
        data_path: str | None = None,
    ) -> None:
        self.root = root
        self.num_nodes = num_nodes
        self.server_env = dict(server_env)
        self.node_env = without_database(node_env)
        self.data_path = data_path
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NativeDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def outputs_dir(self, partition_id: int) -> Path:
        """Return the outputs folder of a SuperNode (its ``outputs-dir``)."""
        return self.root / f"supernode-{partition_id}" / "outputs"

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{name}.log").open("wb") as logfile:
            return subprocess.Popen(
                args,
                env=flower_env(env, folder / "flwr-home"),
                cwd=folder,
                stdout=logfile,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        """Start the SuperLink, wait for it, then start the SuperNodes."""
        self.superlink = self._spawn(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.root / "superlink" / "state.db"),
            ],
            self.server_env,
        )
        wait_healthy(self.address, proc=self.superlink)
        for i in range(self.num_nodes):
            config = node_config(
                i, self.num_nodes, self.data_path, str(self.outputs_dir(i))
            )
            args = [flower_bin("flower-supernode"), "--insecure"]
            args += ["--superlink", self.address, "--node-config", config]
            args += ["--host", "127.0.0.1", "--port", str(free_port())]
            self.supernodes.append(self._spawn(f"supernode-{i}", args, self.node_env))

    def logs(self) -> str:
        """Return the tails of every process log (for failure messages)."""
        parts = []
        for path in sorted(self.root.glob("*/*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every process this deployment started, with all descendants."""
        for proc in [*self.supernodes, self.superlink]:
            if proc is not None:
                kill_tree(proc.pid)
        self.supernodes = []
        self.superlink = None


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
