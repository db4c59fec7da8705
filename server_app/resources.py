"""Checks of the machine a run needs, made before it starts.

A run that would fail minutes in (no GPU for the requested clients, an
outputs folder that cannot take a checkpoint) fails here instead, with one
sentence naming the setting and what would work.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

from server_app.compose import database_url
from server_app.config import AppConfig, ConfigError, ray_address

# Checkpoints, round state, spools and logs of a run: far less than this.
MIN_FREE_BYTES = 16 * 1024 * 1024


def check_writable_dir(path: Path, key: str) -> None:
    """Create ``path`` if needed and check it takes a file and has room.

    Args:
        path: The folder.
        key: The config key or option that named it, for the message.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file; give a folder to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{key}={path} is not writable ({exc.strerror}); choose a folder "
            "you can write to"
        ) from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"{key}={path} has {free // 1024} KiB free; a run needs at least "
            f"{MIN_FREE_BYTES // 2**20} MiB there: free space or choose another folder"
        )


def check_outputs(cfg: AppConfig) -> None:
    """Check the outputs folder and the SQLite file's folder before a run."""
    check_writable_dir(Path(cfg.outputs_dir), "outputs_dir")
    if cfg.tracking.enable_db and database_url(cfg).startswith("sqlite"):
        folder = Path(cfg.db.sqlite_path).expanduser().parent
        check_writable_dir(folder, "db.sqlite_path's folder")


def check_ray_cluster(host: str, port: int) -> None:
    """Check that something answers at the Ray head's address before a run."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"simulation.ray_address={host}:{port}: no Ray cluster answers there "
            f"({exc.strerror or exc}); start one with `ray start --head "
            f"--port={port}`, or set simulation.ray_address=null for Flower's own "
            "local Ray"
        ) from None


def check_compute(cfg: AppConfig) -> None:
    """Check that this machine has the device and can host one simulated client.

    Ray starts no client that asks for more CPUs or GPUs than the machine
    has, and Flower then ends the run with only "ActorPool is empty" in its
    log.
    """
    if str(cfg.train.device) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device=cuda but this machine has no CUDA GPU; use "
                "train.device=auto (the GPU when there is one) or train.device=cpu"
            )
    sim = cfg.simulation
    address = ray_address(cfg)
    if address is not None:
        # The clients run on the cluster's nodes: its resources decide.
        check_ray_cluster(*address)
        return
    cpus = sim.num_cpus or os.cpu_count() or 1
    if sim.client_num_cpus > cpus:
        raise ConfigError(
            f"simulation.client_num_cpus={sim.client_num_cpus} but only {cpus} CPU(s) "
            f"are available to the simulation; use a value up to {cpus}"
        )
    if sim.client_num_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ConfigError(
                f"simulation.client_num_gpus={sim.client_num_gpus:g} but this "
                "machine has no CUDA GPU; set simulation.client_num_gpus=0"
            )
        if sim.client_num_gpus > gpus:
            raise ConfigError(
                f"simulation.client_num_gpus={sim.client_num_gpus:g} but this "
                f"machine has {gpus} GPU(s); use a value up to {gpus}"
            )
