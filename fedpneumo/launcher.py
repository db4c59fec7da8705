"""Run the Flower app through `flwr run` on a private, short-lived SuperLink.

Flower's managed local SuperLink is detached and keeps the environment and
working directory of the first `flwr run` forever. `fedpneumo run` instead
starts its own simulation SuperLink for each command, with this command's
environment (DATABASE_URL included) and working directory, and stops it after.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from fedpneumo.flower import (
    APP_DIR,
    FlowerOutcome,
    flower_bin,
    flower_env,
    flower_status,
    free_port,
    kill_tree,
    run_args,
    stream_run,
    wait_healthy,
    write_connection,
)

log = logging.getLogger(__name__)

CONNECTION = "fedpneumo-local"
# The variables launch_env sets from the config.
LAUNCH_KEYS = ("DATABASE_URL", "RAY_ADDRESS")
# What Flower needs of this project to run it: the app's config, its Hydra
# configs and the packages its components import. `flwr run` walks the whole
# folder it is given before filtering (the repository's .venv too: seconds).
APP_FILES = (
    "pyproject.toml",
    "README.md",
    "conf",
    "server_app",
    "client_app",
    "persistence",
)


def launch_env(url: str = "", ray_address: str | None = None) -> dict[str, str]:
    """Return the environment for the SuperLink: this one, DATABASE_URL, RAY_ADDRESS.

    A server URL (it may hold a password) travels as DATABASE_URL, never in
    the run config. Flower's simulation calls ``ray.init()`` without an
    address, which Ray takes from RAY_ADDRESS: the configured cluster, or
    ``local`` for a Ray of this run's own (never a cluster some other shell or
    `ray start` left). Without arguments: the environment of the defaults.
    """
    env = dict(os.environ)
    if url and not url.startswith("sqlite"):
        env["DATABASE_URL"] = url
    env["RAY_ADDRESS"] = ray_address or "local"
    return env


def lean_app(target: Path) -> Path:
    """Copy this project's Flower app, and only it, to ``target``; return it."""
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in APP_FILES:
        source = APP_DIR / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


class LocalSuperLink:
    """A private simulation SuperLink for one fedpneumo command.

    ``app_dir`` is the Flower app it runs (default: this project's); tests
    pass an app that wraps ours with injected faults.
    """

    def __init__(
        self, env: Mapping[str, str], cwd: Path, app_dir: Path = APP_DIR
    ) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fedpneumo-flwr-"))
        self.port = free_port()
        self.cwd = cwd
        # This project is submitted from a copy holding only the app's files.
        self.app_dir = lean_app(self.home / "app") if app_dir == APP_DIR else app_dir
        self.env = flower_env(env, self.home)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.flwr_run_id: int | None = None

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """Where the SuperLink listens."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The SuperLink's own log."""
        return self.home / "superlink.log"

    def start(self) -> None:
        """Start the SuperLink; ``submit`` waits until it answers.

        Whatever the caller does meanwhile (checking the data and partitions)
        overlaps the second or two the SuperLink takes to come up.
        """
        address = self.address
        write_connection(self.home, CONNECTION, address)
        log_path = self.log_path
        self.proc = subprocess.Popen(
            [
                flower_bin("flower-superlink"),
                "--simulation",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # No --database: the state lives as long as this SuperLink,
                # in memory (its SQLite file cost a write per log upload and
                # twice the idle CPU).
            ],
            env=self.env,
            cwd=self.cwd,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def use_env(self, env: Mapping[str, str]) -> None:
        """Restart the SuperLink if it runs with another environment than ``env``.

        `fedpneumo run` starts it before the config is composed, with the
        defaults' environment (``launch_env()``), so that it boots while the
        config and data are checked; a config that names a database server or
        a Ray cluster of its own costs one more start.
        """
        # Only what launch_env sets is compared: imports may add variables of
        # their own to os.environ meanwhile (flwr sets GRPC_VERBOSITY).
        if all(env.get(key) == self.env.get(key) for key in LAUNCH_KEYS):
            return
        log.debug("restarting the SuperLink with the configured environment")
        if self.proc is not None:
            kill_tree(self.proc.pid)
        self.env = flower_env(env, self.home)
        self.port = free_port()
        self.ready = False
        self.start()

    def wait_ready(self) -> None:
        """Block until the SuperLink answers (once)."""
        if not self.ready:
            wait_healthy(self.address, self.proc, logfile=self.log_path)
            self.ready = True

    def submit(
        self,
        run_config: Mapping[str, str | int],
        federation_config: str,
        on_line: Callable[[str], None],
    ) -> FlowerOutcome:
        """Run the app to its end with `flwr run --stream`; return Flower's verdict."""
        self.wait_ready()
        args = run_args(self.app_dir, CONNECTION, run_config)
        args += ["--federation-config", federation_config]

        def started(run_id: int) -> None:
            self.flwr_run_id = run_id

        return stream_run(
            args,
            env=self.env,
            connection=CONNECTION,
            on_line=on_line,
            on_started=started,
            cwd=self.cwd,
        )

    def status(self, run_id: int) -> tuple[str, str]:
        """Return Flower's (status, details) of a run."""
        return flower_status(self.env, CONNECTION, run_id, self.cwd)

    def stop_run(self, run_id: int) -> None:
        """Ask Flower to stop a run (best effort)."""
        subprocess.run(
            [flower_bin("flwr"), "stop", str(run_id), CONNECTION],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            timeout=30,
            check=False,
        )

    def stop(self) -> None:
        """Stop the SuperLink with everything it started, and delete its home."""
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc = None
        shutil.rmtree(self.home, ignore_errors=True)
