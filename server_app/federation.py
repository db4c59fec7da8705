"""One federated session: open the Run, run Flower's strategy, close the Run."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from client_app.data import DataError
from client_app.messages import TrainInstructions
from client_app.model import build_model
from client_app.trainer import balanced_pos_weight, seed_everything
from fedpneumo.centralized import load_data, model_meta
from fedpneumo.config import (
    AppConfig,
    ConfigError,
    config_from_snapshot,
    database_url,
    load_config,
    partition_seed,
    resolve_paths,
    snapshot,
)
from fedpneumo.progress import ProgressReporter
from persistence import repositories as repo
from persistence.db import get_engine, mask_url, session_scope, upgrade_database
from server_app.evaluate import ROUND_STATE, ServerEvaluator, load_round_state
from server_app.recorder import RunRecorder
from server_app.strategy import make_strategy

log = logging.getLogger(__name__)

NODE_WAIT_S = 60.0
ROUND_TIMEOUT_S = 3600.0
FINISH_TIMEOUT_S = 300.0


def setup_logging() -> None:
    """Show this project's INFO logs in the run's log stream (once each).

    The handler sits on our own loggers, not the root: Flower's logger also
    propagates to the root, and a root handler would print its lines twice.
    """
    for name in ("fedpneumo", "server_app", "client_app", "persistence"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(h, "_fedpneumo", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(levelname)s %(name)s: %(message)s")
            )
            handler._fedpneumo = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float = NODE_WAIT_S) -> int:
    """Wait until the configured number of SuperNodes is connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            if connected > expected:
                log.warning(
                    "%d SuperNodes connected, simulation.num_supernodes=%d",
                    connected,
                    expected,
                )
            return connected
        if time.monotonic() > deadline:
            raise ConfigError(
                f"simulation.num_supernodes={expected} but only {connected} "
                "SuperNodes connected; start that many (flwr run . --federation-"
                f"config 'num-supernodes={expected}') or use `fedpneumo run`"
            )
        time.sleep(1.0)


def instructions(
    cfg: AppConfig, run_id: int, url: str | None, pos_weight: float | None
) -> TrainInstructions:
    """Return the settings every client receives each round."""
    no_secret_url = url if url and "@" not in url else ""
    return TrainInstructions(
        run_id=run_id,
        server_round=0,
        local_epochs=cfg.train.local_epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        optimizer=cfg.train.optimizer,
        weight_decay=cfg.train.weight_decay,
        pos_weight=pos_weight or 0.0,
        augment=cfg.data.augment,
        device=cfg.train.device,
        seed=cfg.seed,
        num_threads=cfg.simulation.client_num_cpus,
        model_name=cfg.model.name,
        model_width=cfg.model.width,
        model_dropout=cfg.model.dropout,
        model_norm=cfg.model.norm,
        data_path=cfg.data.path or "",
        data_limit=cfg.data.limit or 0,
        image_size=cfg.data.image_size,
        partition_name=cfg.partition.name,
        partition_alpha=cfg.partition.alpha,
        partition_classes=cfg.partition.classes_per_client,
        partition_min_size=cfg.partition.min_partition_size,
        partition_seed=partition_seed(cfg),
        client_val_fraction=cfg.data.client_val_fraction,
        outputs_dir=cfg.outputs_dir,
        client_writes=cfg.tracking.client_writes,
        enable_db=cfg.tracking.enable_db,
        db_url=no_secret_url,
    )


def _partition_label(cfg: AppConfig) -> str:
    p = cfg.partition
    if p.name == "dirichlet":
        return f"dirichlet(alpha={p.alpha:g})"
    if p.name == "pathological":
        return f"pathological(classes={p.classes_per_client})"
    return "iid"


def _open_run(cfg: AppConfig, url: str, context: Context, extra: dict[str, Any]) -> int:
    with session_scope(get_engine(url)) as db:
        experiment = repo.get_or_create_experiment(db, name=cfg.experiment_name)
        run = repo.create_run(
            db,
            experiment_id=experiment.id,
            training_mode="federated",
            strategy=cfg.strategy.name,
            partition=_partition_label(cfg),
            seed=cfg.seed,
            num_rounds=cfg.num_rounds,
            config=snapshot(cfg, **extra),
            flwr_run_id=str(context.run_id),
        )
        run.outputs_path = str(Path(cfg.outputs_dir) / "runs" / str(run.id))
        return run.id


def _resume_state(
    url: str, run_id: int, current: AppConfig
) -> tuple[AppConfig, dict[str, Any]]:
    """Load a run's config and its last round state, and clear the unfinished tail."""
    with session_scope(get_engine(url)) as db:
        run = repo.require_run(db, run_id)
        if run.training_mode != "federated" or not run.config:
            raise ConfigError(f"run {run_id} is not a federated run; cannot resume it")
        if run.status == "completed":
            raise ConfigError(f"run {run_id} is already completed")
        cfg = config_from_snapshot(run.config, current)
        state_path = Path(run.outputs_path or "") / ROUND_STATE
        if not state_path.is_file():
            raise ConfigError(
                f"run {run_id} has no round checkpoint at {state_path}; it cannot "
                "be resumed (it failed before its first round completed)"
            )
        state = load_round_state(state_path)
        repo.delete_rounds_after(db, run_id=run_id, round_number=state["round"])
        repo.reopen_run(db, run_id=run_id)
        repo.update_run(db, run_id=run_id, rounds_completed=state["round"])
    return cfg, state


def run_session(grid: Grid, context: Context) -> None:
    """Run one federated session against exactly one Run row."""
    setup_logging()
    overrides = str(context.run_config.get("overrides", ""))
    resume_id = int(context.run_config.get("resume-run-id", 0))
    cfg = resolve_paths(load_config(overrides))
    url = database_url(cfg) if cfg.tracking.enable_db else None
    if url:
        upgrade_database(url)
    state: dict[str, Any] = {}
    if resume_id:
        if not url:
            raise ConfigError(
                "resuming needs the tracking database (tracking.enable_db)"
            )
        cfg, state = _resume_state(url, resume_id, cfg)
    data = load_data(cfg)
    val = data.split("val")
    if cfg.simulation.num_supernodes * cfg.partition.min_partition_size > len(
        data.split("train")
    ):
        raise DataError(
            f"simulation.num_supernodes={cfg.simulation.num_supernodes} needs at least "
            f"{cfg.simulation.num_supernodes * cfg.partition.min_partition_size} "
            f"training images but there are {len(data.split('train'))}"
        )
    num_nodes = wait_for_nodes(grid, cfg.simulation.num_supernodes)

    if url and resume_id:
        run_id = resume_id
    elif url:
        run_id = _open_run(
            cfg, url, context, {"synthetic": data.synthetic, "data_source": data.source}
        )
    else:
        run_id = 0
    run_dir = Path(cfg.outputs_dir) / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(url, run_id, run_dir)
    recorder.start_heartbeat()
    offset = int(state.get("round", 0))
    log.info(
        "federated run %d (%s) on %s: %s, %s, %d clients, rounds %d..%d",
        run_id,
        "resumed" if resume_id else "new",
        mask_url(url) if url else "no database",
        cfg.strategy.name,
        _partition_label(cfg),
        num_nodes,
        offset + 1,
        cfg.num_rounds,
    )
    try:
        _train(cfg, grid, recorder, run_dir, val, num_nodes, state, url)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        recorder.replay_all(timeout_s=30)
        recorder.finish("failed", reason, FINISH_TIMEOUT_S)
        log.error("federated run %d failed: %s", run_id, reason)
        raise
    pending = recorder.replay_all(timeout_s=FINISH_TIMEOUT_S)
    recorder.finish(
        "failed" if pending else "completed",
        f"{pending} metric batches are still spooled; run fedpneumo sync"
        if pending
        else None,
        FINISH_TIMEOUT_S,
    )
    log.info("federated run %d completed", run_id)


def _train(
    cfg: AppConfig,
    grid: Grid,
    recorder: RunRecorder,
    run_dir: Path,
    val: Any,
    num_nodes: int,
    state: dict[str, Any],
    url: str | None,
) -> None:
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model.name,
        width=cfg.model.width,
        dropout=cfg.model.dropout,
        norm=cfg.model.norm,
    )
    offset = int(state.get("round", 0))
    if state:
        model.load_state_dict(state["state_dict"])
    pos_weight = balanced_pos_weight(val.labels) if cfg.train.class_weighting else None
    strategy = make_strategy(cfg, num_nodes)
    strategy.attach(
        recorder,
        instructions(cfg, recorder.run_id, url, pos_weight).to_config(),
        round_offset=offset,
        min_success_fraction=cfg.strategy.min_success_fraction,
        lr_schedule=cfg.train.lr_schedule,
        num_rounds=cfg.num_rounds,
    )
    if state.get("strategy_state"):
        strategy.restore(state["strategy_state"])
    with ProgressReporter("round", cfg.num_rounds, start=offset) as reporter:
        evaluator = ServerEvaluator(
            cfg,
            model,
            val,
            recorder,
            run_dir,
            model_meta(cfg),
            round_offset=offset,
            best_auroc=float(state.get("best_auroc", -math.inf)),
            reporter=reporter,
        )
        evaluator.strategy = strategy
        result = strategy.start(
            grid,
            ArrayRecord(model.state_dict()),
            num_rounds=cfg.num_rounds - offset,
            timeout=ROUND_TIMEOUT_S,
            train_config=ConfigRecord(),
            evaluate_fn=evaluator,
        )
    final = evaluator.save_final(result.arrays)
    recorder.update(final_model_path=str(final))
