"""Deployment: the docker-compose topology, natively on loopback, and relay mode.

No Docker engine runs here: the compose file is checked by the real compose
parser and by its shape, and the same topology (SuperLink with the database,
SuperNodes without it, a one-shot submitter) runs as local processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from sqlalchemy import select, text

from client_app.messages import REPLY_METRICS
from fedpneumo.credentials import make_keys
from fedpneumo.deploy import node_config
from fedpneumo.flower import (
    STARTED,
    flower_bin,
    flower_env,
    process_alive,
    wait_with_descendants,
    write_connection,
)
from persistence.db import get_engine, session_scope
from persistence.models import (
    Client,
    ClientEvaluation,
    Run,
    RunMetric,
    ServerEvaluation,
)
from tests.conftest import REPO_ROOT
from tests.deployment import (
    DATABASE_ENV_PREFIXES,
    NativeDeployment,
    without_database,
)
from tests.pg_server import ThrowawayPostgres

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "Dockerfile"
FLWR_VERSION = "1.42.0"
SUPERNODES = ("supernode-0", "supernode-1")
CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_USER$|DATABASE_URL")
INTERPOLATION = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(?::?[-?][^}]*)?\}")
SMALL = ("data.limit=200", "model.width=8", "simulation.num_supernodes=2")


# Compose file ----------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines of a .env file."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    """Run Debian's docker-compose on our compose file, with no inherited settings."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not installed; install the compose file parser "
            "with `apt-get install -y docker-compose` (CI does this in .ci/run)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    return subprocess.run(
        [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def services() -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml as written (anchors merged)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (either compose syntax)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def test_deploy_compose_file_is_valid_for_the_real_parser(tmp_path: Path) -> None:
    result = compose("config", "-q", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(compose("config", env_file=ENV_EXAMPLE).stdout)
    example = read_env_file(ENV_EXAMPLE)
    url = resolved["services"]["superlink"]["environment"]["DATABASE_URL"]
    assert url == (
        f"postgresql://{example['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{example['POSTGRES_DB']}"
    )
    # Without a password in .env the parser refuses, naming the variable.
    no_password = tmp_path / "no-password.env"
    no_password.write_text(
        "\n".join(f"{k}={v}" for k, v in example.items() if k != "POSTGRES_PASSWORD")
    )
    refused = compose("config", "-q", env_file=no_password)
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr


def test_deploy_compose_shape_postgres_superlink_supernodes_submit() -> None:
    svc = services()
    assert {"postgres", "superlink", *SUPERNODES, "submit"} <= set(svc)

    # postgres: health-checked, data in a named volume, pinned image.
    pg = svc["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    named_volumes = yaml.safe_load(COMPOSE_FILE.read_text())["volumes"]
    pg_volume = next(
        v for v in pg["volumes"] if v.endswith(":/var/lib/postgresql/data")
    )
    assert pg_volume.split(":")[0] in named_volumes
    assert re.fullmatch(r"postgres:15(\.\d+)+(-\w+)?", pg["image"])

    # Every image is pinned; ours is built for the Flower release we depend on.
    for name, service in svc.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
    app = [name for name in svc if name != "postgres"]
    for name in app:
        assert svc[name]["image"].endswith(f"flwr{FLWR_VERSION}"), name
        assert svc[name]["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION, name
        env = environment(svc[name])
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1", name
    assert f"ARG FLWR_VERSION={FLWR_VERSION}" in DOCKERFILE.read_text()

    # No literal credentials: each is a ${VAR} interpolation from .env.
    for name, service in svc.items():
        for key, value in environment(service).items():
            if CREDENTIAL_KEY.search(key):
                assert INTERPOLATION.search(value), (name, key)
                literal = INTERPOLATION.sub("", value)
                assert not re.search(r"://[^@/]*[^@/:]@", literal), (name, key)
    sl_url = environment(svc["superlink"])["DATABASE_URL"]
    assert re.fullmatch(
        r"postgresql://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD[^}]*\}"
        r"@postgres:5432/\$\{POSTGRES_DB[^}]*\}",
        sl_url,
    )
    assert "change-me" not in COMPOSE_FILE.read_text()
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()

    # The SuperLink (ServerApp) has the database; SuperNodes (ClientApps) and
    # the submitter have none of it.
    superlink = svc["superlink"]
    assert "--disable-runtime-dependency-installation" in superlink["command"]
    assert "--simulation" not in superlink["command"]
    assert superlink["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in (*SUPERNODES, "submit"):
        env = environment(svc[name])
        assert not [k for k in env if k.startswith(DATABASE_ENV_PREFIXES)], name
        assert "postgres" not in str(svc[name].get("depends_on", {})), name
    for partition, name in enumerate(SUPERNODES):
        node = svc[name]
        assert node["depends_on"]["register"]["condition"] == (
            "service_completed_successfully"
        )
        command = node["command"]
        assert command[command.index("--superlink") + 1] == "superlink:8000"
        config = command[command.index("--node-config") + 1]
        assert config == (
            f"partition-id={partition} num-partitions={len(SUPERNODES)} "
            'data-path="/data/pneumoniamnist.npz" outputs-dir="/outputs"'
        )
        assert "--allow-runtime-dependency-installation" not in command

    # The submitter: relay mode on PostgreSQL, exits with the run's status.
    submit = " ".join(svc["submit"]["entrypoint"])
    assert "fedpneumo deploy submit --superlink superlink:8000 --keys /keys" in submit
    assert "tracking.client_writes=relay" in submit and "db=postgres" in submit
    assert f"simulation.num_supernodes={len(SUPERNODES)}" in submit
    assert svc["submit"]["restart"] == "no"


def test_deploy_compose_is_secure_by_default_and_holds_no_key_material(
    tmp_path: Path,
) -> None:
    svc = services()
    # TLS and SuperNode authentication; plain text nowhere by default.
    for name, service in svc.items():
        words = [*service.get("command", []), *service.get("entrypoint", [])]
        assert not [w for w in words if "insecure" in str(w)], name
    superlink = svc["superlink"]["command"]
    for flag, path in (
        ("--ssl-certfile", "/keys/superlink.crt"),
        ("--ssl-keyfile", "/keys/superlink.key"),
        ("--ssl-ca-certfile", "/keys/ca.crt"),
    ):
        assert superlink[superlink.index(flag) + 1] == path
    assert "--enable-supernode-auth" in superlink
    assert "https://" in " ".join(svc["superlink"]["healthcheck"]["test"])
    register = svc["register"]
    assert register["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert " ".join(register["entrypoint"]).startswith("fedpneumo deploy register")
    # Key material is mounted read-only, each SuperNode gets only its own key.
    for name, service in svc.items():
        mounts = [v for v in service.get("volumes", []) if ":/keys/" in v]
        assert all(v.endswith(":ro") for v in mounts), name
        if name.startswith("supernode-"):
            index = name.split("-")[1]
            targets = {v.rsplit(":", 2)[1] for v in mounts}
            assert targets == {
                "/keys/ca.crt",
                f"/keys/supernode-{index}",
                f"/keys/supernode-{index}.pub",
            }, name
        if name in ("submit", *SUPERNODES, "register"):
            assert not [v for v in mounts if "superlink.key" in v or "ca.key" in v]
        if name in ("submit", "register"):  # public halves only
            assert not [v for v in mounts if re.search(r"supernode-\d+:", v)], name
    # PostgreSQL: the compose network and the host's loopback only.
    assert all(p.startswith("127.0.0.1:") for p in svc["postgres"]["ports"])
    # No key material in the repository; keys/ is ignored.
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [
        f for f in tracked if f.endswith((".key", ".crt", ".pem")) or "/supernode-" in f
    ]
    assert "keys/" in (REPO_ROOT / ".gitignore").read_text().split()
    # The insecure opt-in is a separate, loudly named file, valid for the parser.
    insecure = compose(
        "-f",
        str(REPO_ROOT / "docker-compose.insecure-local-only.yml"),
        "config",
        "-q",
        env_file=ENV_EXAMPLE,
    )
    assert insecure.returncode == 0, insecure.stderr


def test_deploy_helpers_quote_node_config_and_strip_the_database() -> None:
    assert node_config(1, 2, "/data/a b.npz", "/out") == (
        'partition-id=1 num-partitions=2 data-path="/data/a b.npz" outputs-dir="/out"'
    )
    env = {"PATH": "/bin", "DATABASE_URL": "x", "POSTGRES_PASSWORD": "y", "PGHOST": "z"}
    assert without_database(env) == {"PATH": "/bin"}


# Native deployment -------------------------------------------------------------


class EnvironWatcher:
    """Record the environment of processes under some roots while they live."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        # pid -> (root name, command line, environment)
        self.seen: dict[int, tuple[str, str, dict[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> EnvironWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        # One scan of the process table per tick for all roots: walking it once
        # per root, 20 times a second, took a good part of a core under load.
        while not self._stop.is_set():
            children: dict[int, list[int]] = {}
            for proc in psutil.process_iter(["ppid"]):
                children.setdefault(proc.info["ppid"], []).append(proc.pid)
            for name, root in self.roots.items():
                stack = [root]
                while stack:
                    pid = stack.pop()
                    stack.extend(children.get(pid, []))
                    if pid not in self.seen:
                        self._read(name, pid)
            time.sleep(0.1)

    def _read(self, name: str, pid: int) -> None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return
        if not cmdline:  # a zombie: nothing to read
            return
        env = dict(
            item.decode(errors="replace").partition("=")[::2]
            for item in environ.split(b"\0")
            if item
        )
        self.seen[pid] = (name, cmdline.replace(b"\0", b" ").decode(), env)

    def processes(self, root: str, program: str) -> list[dict[str, str]]:
        """Environments of the processes under a root running a program."""
        return [
            env
            for name, cmd, env in self.seen.values()
            if name == root and program in cmd
        ]


def submit_cli(
    address: str, keys: Path, overrides: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run the compose submitter's command against a SuperLink."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpneumo",
            "deploy",
            "submit",
            "--superlink",
            address,
            "--keys",
            str(keys),
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=without_database(os.environ),
        timeout=600,
        check=False,
    )


def refused_supernodes(
    deployment: NativeDeployment, tmp_path: Path
) -> list[tuple[int, str]]:
    """Start three SuperNodes the SuperLink must refuse; return (exit code, line).

    One with a key that was never registered, one whose CA is not the
    SuperLink's, and Flower's own SuperNode with no CA at all (its whole log).
    """
    other = tmp_path / "other-ca"
    make_keys(other, 3)
    procs = {
        "unknown-key": deployment.start_supernode(2, name="unknown-key"),
        "wrong-ca": deployment.start_supernode(2, keys=other, name="wrong-ca"),
    }
    folder = deployment.root / "no-ca"
    folder.mkdir()
    with (folder / "no-ca.log").open("wb") as log:
        procs["no-ca"] = subprocess.Popen(
            [
                flower_bin("flower-supernode"),
                "--superlink",
                deployment.address,
                "--auth-supernode-private-key",
                str(deployment.keys / "supernode-0"),
                "--node-config",
                node_config(0, 2),
            ],
            env=flower_env(without_database(os.environ), folder / "home"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    results = []
    for name, proc in procs.items():
        code = wait_with_descendants(proc)
        text = (deployment.root / name / f"{name}.log").read_text(errors="replace")
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        results.append((code, errors[-1] if errors and name != "no-ca" else text))
    return results


def online_nodes(deployment: NativeDeployment) -> list[str]:
    """Node ids the SuperLink lists as online (Flower's own record)."""
    home = deployment.root / "operator"
    write_connection(home, "deployment", deployment.address, deployment.ca_cert)
    listed = subprocess.run(
        [flower_bin("flwr"), "supernode", "list", "deployment", "--format", "json"],
        env=flower_env(os.environ, home),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    nodes = json.loads(listed.stdout)["nodes"]
    return [n["node-id"] for n in nodes if n["status"] == "online"]


def processes_with_env_value(fragment: str) -> list[str]:
    """Command lines of live processes whose environment mentions a string."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not process_alive(int(entry.name)):
            continue
        try:
            if fragment.encode() in (entry / "environ").read_bytes():
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                found.append(cmdline.decode(errors="replace"))
        except OSError:
            continue
    return found


def assert_no_database(env: dict[str, str], password: str) -> None:
    """Assert an environment holds no database URL, setting or password."""
    assert not [k for k in env if k.startswith(DATABASE_ENV_PREFIXES)]
    assert not [v for v in env.values() if "postgresql" in v or password in v]


@pytest.mark.e2e
def test_deploy_native_topology_relay(
    pg_server: ThrowawayPostgres, data_file: Path, tmp_path: Path
) -> None:
    url = pg_server.create_database()
    # A host that has the database in its environment: the SuperNodes must
    # not inherit it (NativeDeployment strips it, as compose never sets it).
    host_env = {**os.environ, "DATABASE_URL": url, "PGPASSWORD": pg_server.password}
    deployment = NativeDeployment(
        tmp_path / "deploy",
        num_nodes=2,
        server_env={**without_database(os.environ), "DATABASE_URL": url},
        node_env=host_env,
        data_path=str(data_file),
    )
    server_out = tmp_path / "server-out"
    overrides = [
        "tracking.client_writes=relay",
        "db=postgres",
        f"data.path={data_file}",
        *SMALL,
        # One round: every message kind crosses the wire once; each wave of
        # messages costs a SuperNode poll and a ClientApp process start.
        "num_rounds=1",
        f"outputs_dir={server_out}",
    ]
    with deployment:
        roots = {"superlink": deployment.superlink.pid}  # type: ignore[union-attr]
        roots |= {f"supernode-{i}": p.pid for i, p in enumerate(deployment.supernodes)}
        with EnvironWatcher(roots) as watcher:
            # A session the ServerApp rejects (the submitter exits non-zero),
            # submitted while three SuperNodes the SuperLink must refuse try
            # to join: neither waits on the other.
            with ThreadPoolExecutor(1) as pool:
                rejected = pool.submit(
                    submit_cli,
                    deployment.address,
                    deployment.keys,
                    ["partition.alpha=0"],
                )
                refused = refused_supernodes(deployment, tmp_path)
                bad = rejected.result()
            good = submit_cli(deployment.address, deployment.keys, overrides)
            online = online_nodes(deployment)
        logs = deployment.logs()
    leftovers = processes_with_env_value(str(deployment.root))
    assert not leftovers, f"processes left running: {leftovers}"

    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "finished:failed" in bad.stderr
    # Only the two registered SuperNodes ever joined; the others were refused,
    # each with one line naming why.
    assert len(online) == 2, online
    unknown, wrong_ca, no_ca = refused
    keys = deployment.keys
    assert unknown == (
        1,
        f"error: the SuperLink at {deployment.address} refused SuperNode key "
        f"{keys / 'supernode-2'}: its public key {keys / 'supernode-2.pub'} is not "
        "registered there (the operator admits it with `fedpneumo deploy register`)",
    )
    assert wrong_ca[0] == 1 and wrong_ca[1].startswith(
        f"error: TLS with the SuperLink at {deployment.address} failed "
        "(certificate verify failed"
    )
    assert wrong_ca[1].endswith(
        f"does not verify against {tmp_path / 'other-ca' / 'ca.crt'} (another CA, "
        "or expired)"
    )
    assert no_ca[0] != 0 and "CERTIFICATE_VERIFY_FAILED" in no_ca[1]
    assert good.returncode == 0, good.stdout[-5000:] + good.stderr[-3000:] + logs
    flwr_run_id = STARTED.search(good.stdout).group(1)  # type: ignore[union-attr]
    assert pg_server.password not in good.stdout + good.stderr

    # The SuperNodes, their SuperExecs and every ClientApp caught had no
    # database in their environment; the SuperLink's ServerApp had it.
    for i in range(2):
        root = f"supernode-{i}"
        for program in ("flower-supernode", "flower-superexec"):
            envs = watcher.processes(root, program)
            assert envs, f"no {program} seen under {root}"
            for env in envs:
                assert_no_database(env, pg_server.password)
        clientapps = watcher.processes(root, "flwr-clientapp")
        assert clientapps, f"no flwr-clientapp caught under {root}"
        for env in clientapps:
            assert_no_database(env, pg_server.password)
    serverapps = watcher.processes("superlink", "flwr-serverapp")
    assert serverapps and all(env["DATABASE_URL"] == url for env in serverapps)

    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert (run.training_mode, run.status) == ("federated", "completed")
        assert run.rounds_completed == 1 and run.end_time is not None
        assert run.flwr_run_id == flwr_run_id  # uint64 as text
        assert run.config["tracking"]["client_writes"] == "relay"
        clients = s.scalars(select(Client).order_by(Client.partition_id)).all()
        assert [(c.client_identifier, c.partition_id) for c in clients] == [
            ("client-0", 0),
            ("client-1", 1),
        ]
        assert all(c.node_id and int(c.node_id) > 0 for c in clients)
        per_client_round = s.execute(
            select(
                RunMetric.client_id, RunMetric.round_number, RunMetric.metric_name
            ).where(RunMetric.client_id.is_not(None))
        ).all()
        names: dict[tuple[int, int], set[str]] = {}
        for client_id, round_number, name in per_client_round:
            names.setdefault((client_id, round_number), set()).add(name)
        assert set(names) == {(c.id, 1) for c in clients}
        for key, got in names.items():
            assert set(REPLY_METRICS) <= got, key
        aggregates = s.scalars(
            select(RunMetric.round_number).where(RunMetric.client_id.is_(None))
        ).all()
        assert set(aggregates) == {1}
        evaluations = s.scalars(
            select(ServerEvaluation.round_number).where(
                ServerEvaluation.run_id == run.id
            )
        ).all()
        assert sorted(evaluations) == [0, 1]
        # Each hospital's score of each round's model came back in its
        # evaluate reply and was stored by the server, as in direct mode.
        hospital = s.execute(
            select(
                ClientEvaluation.client_id,
                ClientEvaluation.round_number,
                ClientEvaluation.run_id,
            )
        ).all()
        assert sorted(hospital) == sorted((c.id, 1, run.id) for c in clients)
        run_id = run.id
        # Flower's uint64 ids are text columns (BIGINT would overflow).
        types = s.execute(
            text(
                "SELECT table_name, column_name, data_type FROM "
                "information_schema.columns WHERE column_name IN "
                "('flwr_run_id', 'node_id') AND table_schema = 'public'"
            )
        ).all()
        assert {t for _, _, t in types} == {"character varying"}, types
        assert {(t, c) for t, c, _ in types} >= {
            ("runs", "flwr_run_id"),
            ("clients", "node_id"),
        }

    # Each ClientApp wrote its files under its SuperNode's outputs-dir and
    # spooled nothing for the database: its rows travelled in the replies.
    for i in range(2):
        client_dir = (
            deployment.outputs_dir(i) / "runs" / str(run_id) / "clients" / f"client-{i}"
        )
        assert (client_dir / "metrics.jsonl").is_file()
        assert not (client_dir / "spool").exists()
