"""Run the Flower app through `flwr run` on a private, short-lived SuperLink.

Flower's managed local SuperLink is detached and keeps the environment and
working directory of the first `flwr run` forever. `fedpneumo run` instead
starts its own simulation SuperLink for each command, with this command's
environment (DATABASE_URL included) and working directory, and stops it after.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedpneumo.pg_server import free_port

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedpneumo-local"
STARTED = re.compile(r"Successfully started run (\d+)")
READY_TIMEOUT_S = 60.0


@dataclass
class FlowerOutcome:
    """How Flower saw a run end."""

    flwr_run_id: int | None
    status: str
    details: str
    returncode: int

    @property
    def completed(self) -> bool:
        """Whether Flower reports the run as completed."""
        return self.status == "finished:completed"


def flower_bin(name: str) -> str:
    """Return a console script of this environment (the venv's, not PATH's)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(env: Mapping[str, str], home: Path) -> dict[str, str]:
    """Return an environment for Flower processes: own home, no runtime installs."""
    return {
        **env,
        "FLWR_HOME": str(home),
        # The app runs in this environment; never `uv sync` at run time.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        # Flower finds flower-superexec, flwr-simulation, ... on PATH.
        "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), env.get("PATH", os.defpath)]
        ),
    }


def write_connection(home: Path, name: str, address: str) -> None:
    """Write a Flower ``config.toml`` whose default connection is ``address``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    )


def wait_healthy(
    address: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    logfile: Path | None = None,
) -> None:
    """Block until a SuperLink answers ``/health`` (or its process exits)."""
    url = f"http://{address}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text()[-2000:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"flower-superlink exited early: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SuperLink answered on {url}")
        time.sleep(0.2)


def flower_status(
    env: Mapping[str, str], connection: str, run_id: int, cwd: Path | None = None
) -> tuple[str, str]:
    """Return Flower's (status, details) of a run, e.g. ``finished:completed``."""
    result = subprocess.run(
        [
            flower_bin("flwr"),
            "ls",
            connection,
            "--run-id",
            str(run_id),
            "--format",
            "json",
        ],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        run = json.loads(result.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        return "unknown", result.stdout.strip()[-500:]


def descendants(pid: int) -> list[int]:
    """Return all descendant process ids of pid (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(
    pid: int,
    grace_s: float = 5.0,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL),
) -> None:
    """Terminate a process and all its descendants; SIGKILL what lingers.

    Descendants are collected first: Flower's SuperExec and Ray's workers run
    in sessions of their own, so a process-group kill would miss them.
    """
    victims = [*descendants(pid), pid]
    for sig in signals:
        for victim in victims:
            try:
                os.kill(victim, sig)
            except ProcessLookupError:
                pass
        # SIGKILL is delivered asynchronously too: wait for the exits so callers
        # (resume, stale-run checks) never see a process that is about to vanish.
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(process_alive(v) for v in victims):
            time.sleep(0.1)
    for victim in victims:  # reap our own children
        try:
            os.waitpid(victim, os.WNOHANG)
        except ChildProcessError:
            pass


def process_alive(pid: int) -> bool:
    """Return True if a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def toml_string(value: str) -> str:
    """Quote a string as a TOML basic string (JSON escapes are valid TOML)."""
    return json.dumps(value)


class LocalSuperLink:
    """A private simulation SuperLink for one fedpneumo command."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fedpneumo-flwr-"))
        self.port = free_port()
        self.cwd = cwd
        self.env = flower_env(env, self.home)
        self.proc: subprocess.Popen[bytes] | None = None

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
        args = [
            flower_bin("flwr"),
            "run",
            str(APP_DIR),
            CONNECTION,
            "--federation-config",
            federation_config,
            "--stream",
        ]
        for key, value in run_config.items():
            quoted = toml_string(value) if isinstance(value, str) else str(value)
            args += ["--run-config", f"{key}={quoted}"]
        proc = subprocess.Popen(
            args,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.flwr_proc = proc
        run_id: int | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if run_id is None and (match := STARTED.search(line)):
                run_id = int(match.group(1))
                self.flwr_run_id = run_id
            on_line(line.rstrip("\n"))
        returncode = proc.wait()
        if run_id is None:
            return FlowerOutcome(None, "not-started", "flwr run failed", returncode)
        status, details = self.status(run_id)
        return FlowerOutcome(run_id, status, details, returncode)

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
