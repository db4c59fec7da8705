"""`fedpneumo train` and `fedpneumo evaluate` end to end, on real data when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from persistence.db import get_engine, session_scope
from persistence.models import Run, RunMetric, TestEvaluation
from tests.conftest import REAL_DATA, run_cli

SCORES = ("accuracy", "auroc", "precision", "recall", "f1_score")


@pytest.mark.e2e
def test_train_then_evaluate_reproduces_val_and_test(
    db_url: str, tmp_path: Path, data_file: Path, data_with_test: Path
) -> None:
    result = run_cli(
        "train",
        f"data.path={data_with_test}",
        "data.limit=600",
        "train.epochs=2",
        "model.width=8",
        f"outputs_dir={tmp_path / 'out'}",
        "experiment_name=baseline",
        env={"DATABASE_URL": db_url},
    )
    assert result.returncode == 0, result.stderr
    assert "centralized run" in result.stdout and "completed" in result.stdout
    assert "epoch 2/2" in result.stderr  # plain progress lines off a terminal

    with session_scope(get_engine(db_url)) as s:
        runs = s.scalars(select(Run)).all()
        assert len(runs) == 1
        run = runs[0]
        assert (run.training_mode, run.status) == ("centralized", "completed")
        assert run.end_time is not None and run.config["data"]["limit"] == 600
        assert run.config["synthetic"] is False
        metrics = s.scalars(select(RunMetric)).all()
        assert metrics and {m.run_id for m in metrics} == {run.id}
        final = {
            m.metric_name: m.metric_value
            for m in metrics
            if m.metric_name.startswith("final_val_")
        }
        checkpoint = Path(run.checkpoint_path)
        # The kept model's test score, stored apart from the per-epoch rows.
        test = s.scalars(select(TestEvaluation)).one()
        assert (test.run_id, test.dataset_type) == (run.id, "test")
        best_epoch = next(m.step for m in metrics if m.metric_name == "final_val_auroc")
        assert test.round_number == best_epoch
        assert test.threshold == pytest.approx(final["final_val_threshold"])
    assert checkpoint.is_file()

    evaluated = run_cli(
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data_with_test),
        "--split",
        "val",
        "--json",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    for key in SCORES:
        assert scores[key] == pytest.approx(final[f"final_val_{key}"], abs=1e-6)
    assert scores["num_samples"] == (524 if data_file == REAL_DATA else 200)

    # A file that holds only the test split is enough to score on test.
    with np.load(data_with_test) as npz:
        only_test = {k: npz[k] for k in ("test_images", "test_labels")}
    np.savez(tmp_path / "test_only.npz", **only_test)
    on_test = run_cli(
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(tmp_path / "test_only.npz"),
        "--split",
        "test",
        "--json",
    )
    assert on_test.returncode == 0, on_test.stderr
    scores = json.loads(on_test.stdout)
    for key in SCORES:
        assert scores[key] == pytest.approx(getattr(test, key), abs=1e-6), key
    assert scores["num_samples"] == test.num_samples == 300


def test_train_with_missing_data_path_fails_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    result = run_cli(
        "train",
        f"data.path={tmp_path / 'nope.npz'}",
        f"outputs_dir={tmp_path}",
        env={"DATABASE_URL": f"sqlite:///{db}"},
    )
    assert result.returncode == 2  # bad input (README's exit codes)
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.path")
    assert not db.exists()  # the input is checked before the database is touched
