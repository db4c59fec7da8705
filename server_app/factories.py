"""Build what the config describes: the data, the model and trainer settings.

The ServerApp and the CLI's centralized training both build from here, so a
config key means the same thing in a federated and a centralized run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client_app.data import XrayData, load_data
from client_app.messages import TrainInstructions
from client_app.partition import PartitionSpec, draw_partitions, keep_partitions
from persistence.db import upgrade_database
from server_app.compose import database_url
from server_app.config import AppConfig, ConfigError, partition_seed

if TYPE_CHECKING:
    from torch import nn

    from client_app.trainer import TrainSettings

# torch is imported where a model or trainer is built, not here: the checks
# before a run (data, partitions) need none of it, and it takes seconds.


def configured_data(
    cfg: AppConfig, *, allow_synthetic_fallback: bool = False
) -> XrayData:
    """Load the configured data with ``data.limit`` applied to every split."""
    return load_data(
        cfg.data.path,
        image_size=cfg.data.image_size,
        limit=cfg.data.limit,
        seed=cfg.seed,
        allow_synthetic_fallback=allow_synthetic_fallback,
    )


def centralized_input(cfg: AppConfig) -> tuple[XrayData, str]:
    """Load the data, then migrate the tracking database; return both.

    Returns the data and the database URL ('' with tracking off). Needs no
    torch, so bad input fails before it loads; bad data leaves no trace in
    the database.
    """
    data = configured_data(cfg, allow_synthetic_fallback=True)
    url = database_url(cfg) if cfg.tracking.enable_db else ""
    if url:
        upgrade_database(url)
    return data, url


def model_spec(cfg: AppConfig) -> dict[str, Any]:
    """Return the keyword arguments of ``build_model`` (plain values)."""
    return {
        k: str(v) if isinstance(v, str) else v for k, v in asdict(cfg.model).items()
    }


def model_meta(cfg: AppConfig) -> dict[str, Any]:
    """Return what a checkpoint needs to rebuild its model."""
    return {"model": model_spec(cfg), "image_size": cfg.data.image_size}


def build_model(cfg: AppConfig) -> nn.Module:
    """Build the configured network."""
    from client_app import model as models

    return models.build_model(**model_spec(cfg))


def train_settings(cfg: AppConfig, **overrides: Any) -> TrainSettings:
    """Build the trainer's settings for centralized training from the config."""
    from client_app.trainer import TrainSettings

    t = cfg.train
    values: dict[str, Any] = {
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "lr_schedule": str(t.lr_schedule),
        "optimizer": str(t.optimizer),
        "weight_decay": t.weight_decay,
        "augment": cfg.data.augment,
        "device": str(t.device),
        "seed": cfg.seed,
    }
    values.update(overrides)
    return TrainSettings(**values)


def instructions(
    cfg: AppConfig, run_id: int, url: str | None, pos_weight: float | None = None
) -> TrainInstructions:
    """Return the settings every client receives each round.

    A URL that holds a password is never sent: such clients use their own
    DATABASE_URL (or relay their rows through the server).
    """
    no_secret_url = url if url and "@" not in url else ""
    spec = model_spec(cfg)
    return TrainInstructions(
        run_id=run_id,
        server_round=0,
        local_epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        optimizer=str(cfg.train.optimizer),
        weight_decay=cfg.train.weight_decay,
        pos_weight=pos_weight or 0.0,
        augment=cfg.data.augment,
        device=str(cfg.train.device),
        seed=cfg.seed,
        num_threads=cfg.simulation.client_num_cpus,
        model_name=spec["name"],
        model_width=spec["width"],
        model_dropout=spec["dropout"],
        model_norm=spec["norm"],
        data_path=cfg.data.path or "",
        data_limit=cfg.data.limit or 0,
        image_size=cfg.data.image_size,
        partition_name=str(cfg.partition.name),
        partition_alpha=cfg.partition.alpha,
        partition_classes=cfg.partition.classes_per_client,
        partition_min_size=cfg.partition.min_partition_size,
        partition_seed=partition_seed(cfg),
        client_val_fraction=cfg.data.client_val_fraction,
        outputs_dir=cfg.outputs_dir,
        client_writes=str(cfg.tracking.client_writes),
        enable_db=cfg.tracking.enable_db,
        db_url=no_secret_url,
        privacy=str(cfg.privacy.mode),
    )


def check_partitions(cfg: AppConfig, train_labels: np.ndarray) -> list[int]:
    """Draw the clients' partitions once, so an infeasible split fails early.

    ``train_labels`` are those of the (limited) train split the clients will
    load. Returns the number of training images each client gets. Clients
    draw the same partitions later (same spec, same seed); a failure there
    would only surface as every client erroring in round 1.
    """
    spec = PartitionSpec.from_instructions(
        instructions(cfg, run_id=0, url=None),
        cfg.simulation.num_supernodes,
        cfg.data.path or "",
    )
    try:
        partitions = draw_partitions(spec, train_labels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # The clients read this draw instead of drawing it again.
    keep_partitions(spec, train_labels, Path(cfg.outputs_dir), partitions)
    return [len(rows) for rows in partitions]
