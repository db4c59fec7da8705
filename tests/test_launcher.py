"""The private SuperLink of `fedpneumo run`: started early, restarted if need be."""

from __future__ import annotations

from pathlib import Path

import psutil

from fedpneumo.launcher import LocalSuperLink, launch_env


def gone(pid: int) -> bool:
    """Whether a process has exited (reaped, or a zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_superlink_restarts_only_for_another_database_or_ray_cluster(
    tmp_path: Path,
) -> None:
    # `fedpneumo run` starts it with the defaults' environment before the
    # config is composed, then hands it the configured one.
    with LocalSuperLink(launch_env(), tmp_path) as superlink:
        superlink.wait_ready()
        first, port = superlink.proc.pid, superlink.port
        # Variables imports add meanwhile (flwr sets GRPC_VERBOSITY) do not count.
        superlink.use_env({**launch_env(), "GRPC_VERBOSITY": "debug"})
        assert (superlink.proc.pid, superlink.ready) == (first, True)

        cluster = launch_env(ray_address="127.0.0.1:6379")
        superlink.use_env(cluster)
        assert gone(first) and superlink.port != port
        superlink.wait_ready()  # a new SuperLink answers on its new port
        assert superlink.env["RAY_ADDRESS"] == "127.0.0.1:6379"
        second = superlink.proc.pid

        server = launch_env("postgresql://u:p@127.0.0.1:1/db", "127.0.0.1:6379")
        superlink.use_env(server)
        assert gone(second) and superlink.env["DATABASE_URL"] == server["DATABASE_URL"]
        home, last = superlink.home, superlink.proc.pid
    assert gone(last) and not home.exists()
