"""Flower's processes and CLI, driven from Python.

The helpers every entry point shares: the environment Flower processes get,
the connection file, the health check, and the one loop that follows a
``flwr run --stream`` to its end and asks Flower how the run finished
(``flwr run`` itself exits 0 when a run fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from persistence.errors import FailedRunError

APP_DIR = Path(__file__).resolve().parents[1]
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


class SuperLinkUnavailableError(FailedRunError):
    """No SuperLink answered its health check."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def toml_string(value: str) -> str:
    """Quote a string as a TOML basic string (JSON escapes are valid TOML)."""
    return json.dumps(value)


def run_config_value(value: str) -> str:
    """Quote a string for ``flwr run --run-config key=VALUE``.

    Flower's parser ends a quoted value at the next quote of its kind, escaped
    or not, so a value holding double quotes (JSON) goes as a TOML literal
    string, which has no escapes; any other as a basic string.
    """
    if '"' in value and "'" not in value and value.isprintable():
        return f"'{value}'"
    return toml_string(value)


def write_connection(
    home: Path, name: str, address: str, ca_cert: Path | None = None
) -> None:
    """Write a Flower ``config.toml`` whose default connection is ``address``.

    With ``ca_cert`` the connection is TLS, the SuperLink's certificate checked
    against that CA; without, plain text (a private simulation SuperLink on
    loopback, or an explicitly insecure deployment).
    """
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {toml_string(str(ca_cert.resolve()))}\n"
        if ca_cert
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\n{security}'
    )


def wait_healthy(
    address: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    logfile: Path | None = None,
    ca_cert: Path | None = None,
) -> None:
    """Block until a SuperLink answers ``/health`` (or its process exits).

    With ``ca_cert`` the SuperLink serves TLS, checked against that CA.
    """
    url = f"{'https' if ca_cert else 'http'}://{address}/health"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text()[-2000:] if logfile and logfile.exists() else ""
            raise SuperLinkUnavailableError(f"flower-superlink exited early: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SuperLinkUnavailableError(
                f"no SuperLink answered on {url} within {timeout_s:g} s; check "
                "the address and that the SuperLink runs"
            )
        time.sleep(0.2)


def flower_status(
    env: Mapping[str, str], connection: str, run_id: int, cwd: Path | None = None
) -> tuple[str, str]:
    """Return Flower's (status, details) of a run, e.g. ``finished:completed``."""
    result = subprocess.run(
        [flower_bin("flwr"), "ls", connection, "--run-id", str(run_id)]
        + ["--format", "json"],
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


def run_args(
    app_dir: Path, connection: str, run_config: Mapping[str, str | int]
) -> list[str]:
    """Return ``flwr run APP CONNECTION --stream`` with the run config quoted."""
    args = [flower_bin("flwr"), "run", str(app_dir), connection, "--stream"]
    for key, value in run_config.items():
        quoted = run_config_value(value) if isinstance(value, str) else str(value)
        args += ["--run-config", f"{key}={quoted}"]
    return args


def stream_run(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    connection: str,
    on_line: Callable[[str], None],
    on_started: Callable[[int], None] | None = None,
    cwd: Path | None = None,
) -> FlowerOutcome:
    """Run ``flwr run --stream`` to its end and return Flower's verdict."""
    proc = subprocess.Popen(
        list(args),
        env=dict(env),
        cwd=cwd,
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
                if on_started is not None:
                    on_started(run_id)
            on_line(line.rstrip("\n"))
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave the CLI behind
            kill_tree(proc.pid)
    if run_id is None:
        return FlowerOutcome(None, "not-started", "flwr run failed", returncode)
    status, details = flower_status(env, connection, run_id, cwd)
    return FlowerOutcome(run_id, status, details, returncode)


def descendants(pid: int) -> list[int]:
    """Return all descendant process ids of pid, deepest last."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def running(process: psutil.Process) -> bool:
    """Return True while this very process (not a reused pid) runs, zombies aside."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_alive(pid: int) -> bool:
    """Return True if a process exists and is not a zombie."""
    try:
        return running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def kill_tree(
    pid: int,
    grace_s: float = 5.0,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL),
) -> None:
    """Terminate a process and all its descendants; SIGKILL what lingers.

    Descendants are collected first: Flower's SuperExec and Ray's workers run
    in sessions of their own, so a process-group kill would miss them. The
    call returns only once every victim has exited (or is a zombie), so
    callers (resume, stale-run checks) never see a process about to vanish.
    """
    try:
        root = psutil.Process(pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    kill_processes(victims, grace_s, signals)


def wait_with_descendants(proc: subprocess.Popen, poll_s: float = 0.5) -> int:
    """Wait for a process; then end what it started and left running.

    Its descendants are noted while it runs: once it has exited they are
    orphans no tree walk can find.
    """
    started: dict[int, psutil.Process] = {}
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                started.setdefault(child.pid, child)
        time.sleep(poll_s)
    kill_processes([p for p in started.values() if running(p)])
    return proc.wait()


def kill_processes(
    victims: Sequence[psutil.Process],
    grace_s: float = 5.0,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL),
) -> None:
    """Signal processes (already collected), escalating; wait until they are gone."""
    for sig in signals:
        for victim in victims:
            try:
                victim.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(running(v) for v in victims):
            time.sleep(0.1)
    for victim in victims:  # reap our own children
        try:
            os.waitpid(victim.pid, os.WNOHANG)
        except ChildProcessError:
            pass
