"""A Flower deployment (SuperLink and SuperNodes) as native processes on loopback.

The same topology docker-compose runs in containers, started here for tests:
TLS with the deployment's own CA and SuperNode authentication, each SuperNode
run through ``fedpneumo deploy supernode`` after ``register`` admitted it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedpneumo.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, make_keys
from fedpneumo.deploy import node_config, register
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
        keys: Path | None = None,
    ) -> None:
        self.root = root
        # The key material (made for num_nodes + 1 SuperNodes: the last one's
        # key is never registered).
        self.keys = keys or root / "keys"
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

    @property
    def ca_cert(self) -> Path:
        """The CA the SuperLink's certificate is checked against."""
        return self.keys / CA_CERT

    def start(self) -> None:
        """Make keys, start the SuperLink, admit the SuperNodes and start them."""
        if not (self.keys / CA_CERT).exists():
            make_keys(self.keys, self.num_nodes + 1)
        self.superlink = self._spawn(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--ssl-certfile",
                str(self.keys / SERVER_CERT),
                "--ssl-keyfile",
                str(self.keys / SERVER_KEY),
                "--ssl-ca-certfile",
                str(self.keys / CA_CERT),
                "--enable-supernode-auth",
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
        wait_healthy(self.address, proc=self.superlink, ca_cert=self.ca_cert)
        register(self.keys, self.address, range(self.num_nodes))
        for i in range(self.num_nodes):
            self.supernodes.append(self.start_supernode(i))

    def start_supernode(
        self,
        index: int,
        keys: Path | None = None,
        extra: Sequence[str] = (),
        name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start SuperNode ``index`` through `fedpneumo deploy supernode`.

        ``name`` is its folder under the deployment (default supernode-N).
        """
        config = node_config(
            index, self.num_nodes, self.data_path, str(self.outputs_dir(index))
        )
        args = [sys.executable, "-m", "fedpneumo", "deploy", "supernode"]
        args += ["--keys", str(keys or self.keys), "--index", str(index)]
        args += ["--superlink", self.address, "--node-config", config, *extra]
        args += ["--host", "127.0.0.1", "--port", str(free_port())]
        return self._spawn(name or f"supernode-{index}", args, self.node_env)

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
