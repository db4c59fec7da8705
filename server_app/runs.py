"""The Run row of a federated session: open it, or reopen it for a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from sqlalchemy.orm import Session

from persistence import repositories as repo
from persistence.db import get_engine, session_scope
from persistence.models import Run, RunStatus
from server_app.compose import config_from_snapshot, snapshot
from server_app.config import AppConfig, ConfigError, partition_label
from server_app.factories import build_model
from server_app.round_state import ROUND_STATE, load_round_state


def open_run(cfg: AppConfig, url: str, context: Context, extra: dict[str, Any]) -> int:
    """Create the session's one Run row (``in_progress``) and return its id."""
    with session_scope(get_engine(url)) as db:
        experiment = repo.get_or_create_experiment(db, name=cfg.experiment_name)
        run = repo.create_run(
            db,
            experiment_id=experiment.id,
            training_mode="federated",
            strategy=str(cfg.strategy.name),
            partition=partition_label(cfg),
            seed=cfg.seed,
            num_rounds=cfg.num_rounds,
            config=snapshot(cfg, **extra),
            flwr_run_id=str(context.run_id),
            privacy=None if cfg.privacy.mode == "none" else str(cfg.privacy.mode),
        )
        run.outputs_path = str(Path(cfg.outputs_dir) / "runs" / str(run.id))
        return run.id


def resumable_run(db: Session, run_id: int) -> Run:
    """Return a run that can be resumed, or raise naming why it cannot."""
    run = repo.require_run(db, run_id)
    if run.training_mode != "federated":
        raise ConfigError(f"run {run_id} is centralized; only federated runs resume")
    if not run.config:
        raise ConfigError(f"run {run_id} has no stored config; it cannot be resumed")
    if run.status == RunStatus.COMPLETED:
        raise ConfigError(f"run {run_id} is already completed; nothing to resume")
    return run


def checked_round_state(cfg: AppConfig, run_dir: Path, run_id: int) -> dict[str, Any]:
    """Load a run's round checkpoint and check it fits the run's model.

    Raises ConfigError naming the problem, before anything is changed.
    """
    if not run_dir.is_dir():
        raise ConfigError(
            f"run {run_id}'s outputs folder {run_dir} does not exist or is not a "
            "folder; it cannot be resumed"
        )
    path = run_dir / ROUND_STATE
    state = load_round_state(path)
    try:
        build_model(cfg).load_state_dict(state["state_dict"])
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{path} holds weights that do not fit run {run_id}'s model "
            f"({cfg.model.name}): {first}; it cannot be resumed"
        ) from None
    return state


def resume_state(
    url: str, run_id: int, current: AppConfig
) -> tuple[AppConfig, dict[str, Any]]:
    """Load a run's config and its last round state, and clear the unfinished tail."""
    with session_scope(get_engine(url)) as db:
        run = resumable_run(db, run_id)
        cfg = config_from_snapshot(run.config or {}, current)
        # Checked before the rows after it are deleted: a refused resume
        # leaves the run as it was.
        state = checked_round_state(cfg, Path(run.outputs_path or ""), run_id)
        repo.delete_rounds_after(db, run_id=run_id, round_number=state["round"])
        repo.reopen_run(db, run_id=run_id)
        repo.update_run(db, run_id=run_id, rounds_completed=state["round"])
    return cfg, state
