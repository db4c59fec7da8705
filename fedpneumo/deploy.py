"""Flower deployment (not simulation): a SuperLink, SuperNodes and a submitter.

docker-compose runs this topology in containers (see ``docker-compose.yml``);
the test suite runs the same processes natively on loopback. Secure by
default: the SuperLink serves TLS with the consortium CA's certificate and
admits only SuperNodes whose keys were registered (``fedpneumo deploy keys``
makes the key material, ``register`` admits the nodes, ``supernode`` runs one
and says in one line why the SuperLink refused it). ``submit`` sends one
session to a SuperLink, streams its logs and exits non-zero unless Flower
reports the run completed: ``flwr run`` itself exits 0 when a run fails.

With ``--isolation subprocess`` the SuperLink and every SuperNode start their
own ``flower-superexec``; the ServerApp then runs with the SuperLink's
environment (DATABASE_URL) and each ClientApp with its SuperNode's (none).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedpneumo.credentials import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    CredentialError,
    check_certificate,
    check_key_pair,
    check_private_key,
    check_public_key,
    node_keys,
)
from fedpneumo.flower import (
    APP_DIR,
    FlowerOutcome,
    flower_bin,
    flower_env,
    run_args,
    stream_run,
    toml_string,
    wait_with_descendants,
    write_connection,
)
from fedpneumo.launcher import lean_app
from persistence.errors import FailedRunError

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
    ca_cert: Path | None = None,
) -> FlowerOutcome:
    """Run one session on a deployed SuperLink to its end; return Flower's verdict.

    Args:
        address: The SuperLink's ``host:port``.
        overrides: Hydra overrides, joined into the ``overrides`` run config.
        app_dir: The Flower app to build and submit.
        home: FLWR_HOME for the CLI (default: a temporary folder).
        on_line: Receives every streamed log line (default: stdout).
        env: Environment of the ``flwr`` CLI (default: this process's).
        ca_cert: The CA the SuperLink's TLS certificate is checked against
            (None: a plain-text, insecure SuperLink).
    """
    own_home = home is None
    home = Path(tempfile.mkdtemp(prefix="fedpneumo-submit-")) if home is None else home
    write_connection(home, CONNECTION, address, ca_cert)
    # This project is submitted from a copy holding only the app's files.
    staging = Path(tempfile.mkdtemp(prefix="fedpneumo-app-"))
    if app_dir == APP_DIR:
        app_dir = lean_app(staging / "app")
    cli_env = flower_env(env if env is not None else os.environ, home)
    args = run_args(app_dir, CONNECTION, {"overrides": shlex.join(overrides)})
    try:
        return stream_run(
            args, env=cli_env, connection=CONNECTION, on_line=on_line or echo_line
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


def check_keys(keys: Path, *, server: bool = True, nodes: Sequence[int] = ()) -> None:
    """Check the key material before a process uses it; name a bad file.

    Raises:
        CredentialError: a missing, unreadable, expired or mismatched file.
    """
    ca = keys / CA_CERT
    check_certificate(ca, ca)  # the CA itself: readable and current
    if server:
        check_certificate(keys / SERVER_CERT, ca)
        check_key_pair(keys / SERVER_CERT, keys / SERVER_KEY)
    for index in nodes:
        check_private_key(node_keys(keys, index).private)


def flwr_cli(home: Path, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI against the connection written in ``home``."""
    return subprocess.run(
        [flower_bin("flwr"), *args],
        env=flower_env(os.environ, home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def register(keys: Path, superlink: str, nodes: Sequence[int]) -> dict[int, int | None]:
    """Admit SuperNodes: register their public keys with the SuperLink.

    Returns Flower's node id of each newly registered index, None for a key
    registered before (a restarted stack registers nothing twice).
    """
    # Only the public halves: the operator need not hold hospitals' private keys.
    check_keys(keys, server=False)
    for index in nodes:
        check_public_key(node_keys(keys, index).public)
    home = Path(tempfile.mkdtemp(prefix="fedpneumo-register-"))
    try:
        write_connection(home, CONNECTION, superlink, keys / CA_CERT)
        ids: dict[int, int | None] = {}
        for index in nodes:
            public = node_keys(keys, index).public
            done = flwr_cli(
                home,
                ["supernode", "register", str(public), CONNECTION, "--format", "json"],
            )
            reply = _json(done)
            if "node-id" in reply:
                ids[index] = int(reply["node-id"])
            elif ALREADY_REGISTERED in str(reply.get("error-message", "")):
                ids[index] = None
            else:
                raise FailedRunError(
                    f"registering {public} with {superlink} failed: {_flwr_error(done)}"
                )
        return ids
    finally:
        shutil.rmtree(home, ignore_errors=True)


# Flower's answer to a key registered before.
ALREADY_REGISTERED = "Public key already in use"


def _json(done: subprocess.CompletedProcess[str]) -> dict:
    try:
        value = json.loads(done.stdout)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _flwr_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error Flower's CLI reported, in one line."""
    reply = _json(done)
    text = str(reply.get("error-message") or done.stderr or done.stdout).strip()
    return " ".join(text.split())[:300] or f"exit code {done.returncode}"


# What flower-supernode prints (on stderr, then exits 1) when the SuperLink
# turns it away.
KEY_REFUSED = re.compile(r"\[code: 2004\] Failed to activate SuperNode")
TLS_FAILED = re.compile(r"\[SSL: ([A-Z_]+)\] ([^(\n]+)")


def supernode_args(
    keys: Path | None,
    index: int,
    superlink: str,
    config: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """Return the ``flower-supernode`` command of SuperNode ``index``.

    ``keys`` None is the explicit insecure mode: plain text, no node key.
    """
    args = [flower_bin("flower-supernode"), "--superlink", superlink]
    if keys is None:
        args.append("--insecure")
    else:
        private = node_keys(keys, index).private
        args += ["--root-certificates", str(keys / CA_CERT)]
        args += ["--auth-supernode-private-key", str(private)]
    return [*args, "--node-config", config, *extra]


def run_supernode(
    keys: Path | None,
    index: int,
    superlink: str,
    config: str,
    extra: Sequence[str] = (),
    on_line: Callable[[str], None] = echo_line,
) -> None:
    """Run one SuperNode until it stops; a refusal by the SuperLink is one line.

    Raises:
        CredentialError: its key or the CA is unusable (checked first).
        FailedRunError: the SuperLink refused its key or its TLS handshake
            failed, or the SuperNode ended otherwise (Flower's reason).
    """
    if keys is not None:
        check_keys(keys, server=False, nodes=[index])
    args = supernode_args(keys, index, superlink, config, extra)
    home = Path(tempfile.mkdtemp(prefix="fedpneumo-node-"))
    try:
        code, output = _follow(args, home, on_line)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if code == 0:
        return
    tail = "\n".join(output[-200:])
    raise FailedRunError(refusal(keys, index, superlink, tail, code))


def _follow(
    args: Sequence[str], home: Path, on_line: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Run a SuperNode to its end, echoing its output; return code and lines."""
    proc = subprocess.Popen(
        list(args),
        env=flower_env(os.environ, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []

    def follow() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            on_line(output[-1])

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    # The SuperExec it starts outlives a refused SuperNode (and holds its
    # output open): it goes when the SuperNode does.
    code = wait_with_descendants(proc)
    reader.join(timeout=10)
    return code, output


def refusal(
    keys: Path | None, index: int, superlink: str, output: str, code: int
) -> str:
    """Say in one line why a SuperNode stopped, from flower-supernode's output."""
    if keys is not None and KEY_REFUSED.search(output):
        files = node_keys(keys, index)
        return (
            f"the SuperLink at {superlink} refused SuperNode key {files.private}: its "
            f"public key {files.public} is not registered there (the operator admits "
            "it with `fedpneumo deploy register`)"
        )
    tls = TLS_FAILED.search(output)
    if tls:
        reason = tls.group(2).strip()
        if keys is None:
            return (
                f"TLS with the SuperLink at {superlink} failed ({reason}): this "
                "SuperNode has no CA certificate to check it with (--keys)"
            )
        return (
            f"TLS with the SuperLink at {superlink} failed ({reason}): its "
            f"certificate does not verify against {keys / CA_CERT} (another CA, or "
            "expired)"
        )
    errors = [ln for ln in output.splitlines() if "ERROR" in ln or "Error" in ln]
    last = re.sub(r"\x1b\[[0-9;]*m", "", errors[-1]).strip() if errors else ""
    return f"SuperNode {index} stopped (exit code {code}): {last or 'see its log'}"


__all__ = ["CredentialError", "check_keys", "register", "run_supernode", "submit"]
