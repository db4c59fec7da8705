"""A throwaway Ray cluster (`ray start --head`) on loopback, for tests.

Every port is a free one and the session folder is private, so the cluster
never meets another test's Ray; it is stopped by killing the processes that
carry its folder, never with `ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from fedpneumo.flower import free_port


class ThrowawayRay:
    """A one-node Ray cluster with its own ports and temp folder."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.port = free_port()
        # Ray's session paths sit inside unix socket names: keep it short.
        self.root = Path(tempfile.mkdtemp(prefix="fpray-", dir="/tmp"))
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> ThrowawayRay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the head node and wait until it accepts drivers."""
        ports = {
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        args = [str(Path(sys.executable).parent / "ray"), "start", "--head"]
        args += [f"--port={self.port}", f"--num-cpus={self.num_cpus}"]
        args += ["--include-dashboard=false", "--disable-usage-stats"]
        args += [f"--temp-dir={self.root}"]
        args += [f"{flag}={port}" for flag, port in ports.items()]
        subprocess.run(args, check=True, capture_output=True, timeout=120)

    def processes(self) -> list[psutil.Process]:
        """Return this cluster's processes (those whose command names its folder)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.root) in cmdline:
                found.append(proc)
        return found

    def driver_query(self, code: str) -> Any:
        """Run Python in a driver attached to the cluster; return what it prints."""
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={"RAY_ADDRESS": self.address, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout

    def stop(self) -> None:
        """Kill the cluster's processes (workers too) and delete its folder."""
        victims = {}
        for proc in self.processes():
            for each in [proc, *proc.children(recursive=True)]:
                victims[each.pid] = each
        for proc in victims.values():
            proc.terminate()
        _, alive = psutil.wait_procs(victims.values(), timeout=5)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
