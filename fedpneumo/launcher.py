"""Run the Flower app through `flwr run` on a private, short-lived SuperLink.

Flower's managed local SuperLink is detached and keeps the environment and
working directory of the first `flwr run` forever. `fedpneumo run` instead
starts its own simulation SuperLink for each command, with this command's
environment (DATABASE_URL included) and working directory, and stops it after.
"""

from __future__ import annotations

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

CONNECTION = "fedpneumo-local"


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
        self.app_dir = app_dir
        self.env = flower_env(env, self.home)
        self.proc: subprocess.Popen[bytes] | None = None
        self.flwr_run_id: int | None = None

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink and wait until it answers."""
        address = f"127.0.0.1:{self.port}"
        write_connection(self.home, CONNECTION, address)
        log_path = self.home / "superlink.log"
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
                "--database",
                str(self.home / "state.db"),
            ],
            env=self.env,
            cwd=self.cwd,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_healthy(address, self.proc, logfile=log_path)

    def submit(
        self,
        run_config: Mapping[str, str | int],
        federation_config: str,
        on_line: Callable[[str], None],
    ) -> FlowerOutcome:
        """Run the app to its end with `flwr run --stream`; return Flower's verdict."""
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
