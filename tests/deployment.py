"""A Flower deployment (SuperLink and SuperNodes) as native processes on loopback.

The same topology docker-compose runs in containers, started here for tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from fedpneumo.deploy import node_config
from fedpneumo.flower import (
    flower_bin,
    flower_env,
    free_port,
    kill_tree,
    wait_healthy,
)

# Variables that would hand a SuperNode (and so its ClientApps) the database.
DATABASE_ENV_PREFIXES = ("DATABASE_URL", "POSTGRES_", "PG")


def without_database(env: Mapping[str, str]) -> dict[str, str]:
    """Return the environment with every database variable removed."""
    return {
        k: v
        for k, v in env.items()
        if not any(k.startswith(p) for p in DATABASE_ENV_PREFIXES)
    }


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
