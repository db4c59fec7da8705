"""Rows the tests start from, made with the real repositories."""

from __future__ import annotations

from persistence import repositories as repo
from persistence.db import get_engine, session_scope


def federated_run(url: str, experiment: str = "tests") -> int:
    """Create an experiment (once) and an in-progress federated run; return its id."""
    with session_scope(get_engine(url)) as db:
        experiment_id = repo.get_or_create_experiment(db, name=experiment).id
        return repo.create_run(
            db, experiment_id=experiment_id, training_mode="federated"
        ).id
