"""Centralized baseline training and checkpoint evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from client_app.data import XrayData, load_data_file
from client_app.metrics import NonFiniteOutputError
from client_app.metrics_collector import MetricsCollectorCallback
from client_app.splits import DataError
from client_app.trainer import (
    Callback,
    CheckpointError,
    FitResult,
    balanced_pos_weight,
    evaluate,
    fit,
    restore_model,
)
from fedpneumo.progress import ProgressReporter
from persistence import repositories as repo
from persistence.db import get_engine, session_scope
from server_app.compose import snapshot
from server_app.config import AppConfig
from server_app.factories import (
    build_model,
    model_meta,
    train_settings,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "best_model.pt"


@dataclass
class CentralizedResult:
    """The outcome of ``fedpneumo train``."""

    run_id: int
    save_dir: Path
    fit: FitResult
    data: XrayData


class EpochProgress(Callback):
    """Trainer callback that reports epochs to a ProgressReporter."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Advance the bar by one epoch."""
        self.reporter.advance(epoch, metrics)


def centralized_collector(
    cfg: AppConfig, url: str, save_dir: Path, data: XrayData
) -> MetricsCollectorCallback:
    """Return a collector that creates the centralized Run in the experiment."""
    experiment_id = None
    if url:
        with session_scope(get_engine(url)) as db:
            experiment = repo.get_or_create_experiment(db, name=cfg.experiment_name)
            experiment_id = experiment.id
    return MetricsCollectorCallback(
        save_dir,
        experiment_name=cfg.experiment_name,
        experiment_id=experiment_id,
        training_mode="centralized",
        enable_db_persistence=cfg.tracking.enable_db,
        database_url=url or None,
        run_fields={
            "seed": cfg.seed,
            "num_rounds": cfg.train.epochs,
            "config": snapshot(cfg, synthetic=data.synthetic, data_source=data.source),
        },
    )


def run_centralized(cfg: AppConfig, data: XrayData, url: str) -> CentralizedResult:
    """Train on the train split, select on val, record one centralized run.

    ``data`` and ``url`` come from ``centralized_input``, which the caller
    runs first so that bad input fails before torch loads.
    """
    train, val = data.split("train"), data.split("val")
    test = data.splits.get("test")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    save_dir = Path(cfg.outputs_dir) / "centralized" / stamp
    collector = centralized_collector(cfg, url, save_dir, data)
    settings = train_settings(
        cfg,
        pos_weight=balanced_pos_weight(train.labels)
        if cfg.train.class_weighting
        else None,
        select_best=True,
        checkpoint_path=save_dir / CHECKPOINT_NAME,
        checkpoint_meta=model_meta(cfg),
    )
    model = build_model(cfg)
    log.info(
        "centralized training: %d train / %d val images from %s, %d epochs",
        len(train),
        len(val),
        data.source,
        cfg.train.epochs,
    )
    with ProgressReporter("epoch", cfg.train.epochs) as reporter:
        result = fit(
            model,
            train,
            val,
            settings,
            test=test,
            callbacks=[collector, EpochProgress(reporter)],
        )
    assert collector.run_id is not None or not cfg.tracking.enable_db
    return CentralizedResult(
        run_id=collector.run_id or 0, save_dir=save_dir, fit=result, data=data
    )


def evaluate_checkpoint(
    checkpoint: Path, data_path: str, split: str = "val"
) -> dict[str, float]:
    """Score a saved model on a split of any supported data file or folder."""
    model, state = restore_model(checkpoint)
    if not data_path.strip():
        raise DataError(
            "--data is empty; give a .npz file or a Kermany image folder to score on"
        )
    # Any file holding the split will do: a test-only file is the usual case.
    data = load_data_file(data_path, image_size=int(state.get("image_size", 28)))
    threshold = float(state["threshold"])
    if not math.isfinite(threshold):
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} has decision threshold {threshold}; "
            "a saved model's threshold is a number between 0 and 1"
        )
    try:
        with torch.no_grad():
            return evaluate(model, data.split(split), threshold=threshold)
    except NonFiniteOutputError as exc:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} gives no usable predictions ({exc}); "
            "its weights are not finite numbers"
        ) from None
