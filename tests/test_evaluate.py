"""Server-side evaluation, checkpoints and round state (server_app/evaluate.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from sqlalchemy import select

from client_app.data import Split, make_synthetic
from client_app.metric_keys import SERVER_EVAL_KEYS
from client_app.trainer import evaluate, load_checkpoint
from persistence import repositories as repo
from persistence.db import get_engine, session_scope
from persistence.models import ServerEvaluation
from server_app.compose import load_config
from server_app.config import AppConfig
from server_app.evaluate import BEST_MODEL, FINAL_MODEL, ServerEvaluator
from server_app.events import ROUND_EVALUATED, parse_event
from server_app.factories import build_model, model_meta
from server_app.recorder import RunRecorder
from server_app.round_state import ROUND_STATE, load_round_state
from server_app.strategy import make_strategy
from tests.factories import federated_run


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return load_config(["model.width=8", "train.device=cpu", "num_rounds=3"])


@pytest.fixture(scope="module")
def val() -> Split:
    return make_synthetic(n_train=0, n_val=64, seed=5).split("val")


@pytest.fixture
def events(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger("server_app"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("server_app.events"), "propagate", True)
    caplog.set_level(logging.INFO, logger="server_app.events")
    return caplog


def model_arrays(cfg: AppConfig, seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(build_model(cfg).state_dict())


def evaluator_for(
    cfg: AppConfig,
    val: Split,
    recorder: RunRecorder,
    **kwargs: float,
) -> ServerEvaluator:
    return ServerEvaluator(
        cfg,
        build_model(cfg),
        val,
        recorder,
        recorder.run_dir,
        model_meta(cfg),
        **kwargs,  # type: ignore[arg-type]
    )


def same_weights(state: dict[str, torch.Tensor], arrays: ArrayRecord) -> bool:
    expected = arrays.to_torch_state_dict()
    return state.keys() == expected.keys() and all(
        torch.equal(state[k].cpu(), expected[k]) for k in expected
    )


def event_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    found = [parse_event(r.getMessage()) for r in caplog.records]
    return [e for e in found if e]


def test_rounds_are_scored_recorded_and_checkpointed(
    cfg: AppConfig,
    val: Split,
    sqlite_url: str,
    tmp_path: Path,
    events: pytest.LogCaptureFixture,
) -> None:
    run_id = federated_run(sqlite_url)
    recorder = RunRecorder(sqlite_url, run_id, tmp_path / "runs" / str(run_id))
    evaluator = evaluator_for(cfg, val, recorder)
    arrays = {0: model_arrays(cfg, 0), 1: model_arrays(cfg, 1)}

    results: dict[int, MetricRecord] = {}
    for server_round in (0, 1):
        result = evaluator(server_round, arrays[server_round])
        assert result is not None
        assert set(result) == {*SERVER_EVAL_KEYS, "threshold"}
        assert result["num_samples"] == 64.0
        results[server_round] = result
    assert recorder.replay_all(timeout_s=5) == 0
    aurocs = {r: float(results[r]["auroc"]) for r in results}  # type: ignore[arg-type]
    best_round = max(aurocs, key=aurocs.__getitem__)

    with session_scope(get_engine(sqlite_url)) as db:
        rows = db.scalars(
            select(ServerEvaluation).order_by(ServerEvaluation.round_number)
        ).all()
        assert [(r.run_id, r.round_number) for r in rows] == [(run_id, 0), (run_id, 1)]
        for row in rows:
            assert row.auroc == pytest.approx(aurocs[row.round_number])
            assert row.num_samples == 64 and row.eval_seconds > 0
        run = repo.require_run(db, run_id)
        assert run.rounds_completed == 1
        assert run.checkpoint_path == str(recorder.run_dir / BEST_MODEL)

    best = load_checkpoint(recorder.run_dir / BEST_MODEL)
    assert best["round"] == best_round
    assert best["threshold"] == pytest.approx(results[best_round]["threshold"])
    assert best["model"]["width"] == 8 and best["image_size"] == 28
    assert same_weights(best["state_dict"], arrays[best_round])

    state = load_round_state(recorder.run_dir / ROUND_STATE)
    assert state["round"] == 1
    assert state["best_auroc"] == pytest.approx(aurocs[best_round])
    assert state["strategy_state"] == {}
    assert same_weights(state["state_dict"], arrays[1])

    lines = event_lines(events)
    assert [(e["event"], e["round"], e["total"]) for e in lines] == [
        (ROUND_EVALUATED, 0, 3),
        (ROUND_EVALUATED, 1, 3),
    ]
    assert lines[1]["metrics"]["auroc"] == pytest.approx(aurocs[1])


def test_round_zero_writes_no_round_state(
    cfg: AppConfig, val: Split, tmp_path: Path
) -> None:
    recorder = RunRecorder(None, 0, tmp_path / "run")
    evaluator_for(cfg, val, recorder)(0, model_arrays(cfg, 0))
    assert (tmp_path / "run" / BEST_MODEL).is_file()
    assert not (tmp_path / "run" / ROUND_STATE).exists()


def test_a_resumed_run_continues_round_numbers(
    cfg: AppConfig,
    val: Split,
    sqlite_url: str,
    tmp_path: Path,
    events: pytest.LogCaptureFixture,
) -> None:
    run_id = federated_run(sqlite_url)
    recorder = RunRecorder(sqlite_url, run_id, tmp_path / "run")
    evaluator = evaluator_for(cfg, val, recorder, round_offset=2)
    # The initial model was evaluated before the resume.
    assert evaluator(0, model_arrays(cfg, 0)) is None
    assert evaluator(1, model_arrays(cfg, 1)) is not None
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(sqlite_url)) as db:
        rounds = db.scalars(select(ServerEvaluation.round_number)).all()
        assert rounds == [3]
        assert repo.require_run(db, run_id).rounds_completed == 3
    assert load_round_state(tmp_path / "run" / ROUND_STATE)["round"] == 3
    assert [e["round"] for e in event_lines(events)] == [3]
    assert list(evaluator.history) == [3]


def test_a_better_earlier_round_keeps_its_checkpoint(
    cfg: AppConfig, val: Split, sqlite_url: str, tmp_path: Path
) -> None:
    run_id = federated_run(sqlite_url)
    recorder = RunRecorder(sqlite_url, run_id, tmp_path / "run")
    # Resumed after a round that scored a perfect AUROC: nothing beats it.
    evaluator = evaluator_for(cfg, val, recorder, round_offset=1, best_auroc=1.0)
    evaluator(1, model_arrays(cfg, 1))
    assert not (tmp_path / "run" / BEST_MODEL).exists()
    assert load_round_state(tmp_path / "run" / ROUND_STATE)["best_auroc"] == 1.0
    with session_scope(get_engine(sqlite_url)) as db:
        assert repo.require_run(db, run_id).checkpoint_path is None


def test_round_state_holds_the_strategy_state(
    cfg: AppConfig, val: Split, tmp_path: Path
) -> None:
    recorder = RunRecorder(None, 0, tmp_path / "run")
    evaluator = evaluator_for(cfg, val, recorder)
    strategy = make_strategy(load_config(["strategy=fedavgm"]), num_nodes=3)
    strategy.restore({"momentum_vector": [np.full(3, 0.5)]})
    evaluator.strategy = strategy
    evaluator(1, model_arrays(cfg, 1))
    state = load_round_state(tmp_path / "run" / ROUND_STATE)
    saved = state["strategy_state"]
    assert list(saved) == ["momentum_vector"]
    assert np.array_equal(saved["momentum_vector"][0], np.full(3, 0.5))


def test_save_final_uses_the_last_rounds_threshold(
    cfg: AppConfig, val: Split, tmp_path: Path
) -> None:
    recorder = RunRecorder(None, 0, tmp_path / "run")
    evaluator = evaluator_for(cfg, val, recorder)
    last = model_arrays(cfg, 2)
    evaluator(0, model_arrays(cfg, 0))
    result = evaluator(1, last)
    assert result is not None
    path = evaluator.save_final(last)
    assert path == tmp_path / "run" / FINAL_MODEL
    final = load_checkpoint(path)
    assert final["round"] == 1
    assert final["threshold"] == pytest.approx(result["threshold"])
    assert same_weights(final["state_dict"], last)


def test_save_final_without_evaluations_scores_the_model_for_its_threshold(
    cfg: AppConfig, val: Split, tmp_path: Path
) -> None:
    # A resumed run whose rounds all ran before evaluates nothing itself: its
    # final model still gets its own val threshold, not a default.
    evaluator = evaluator_for(cfg, val, RunRecorder(None, 0, tmp_path / "run"))
    evaluator.round_offset = 4
    arrays = model_arrays(cfg, 0)
    final = load_checkpoint(evaluator.save_final(arrays))
    model = build_model(cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    own = evaluate(model, val, device="cpu")["threshold"]
    assert (final["round"], final["threshold"]) == (4, pytest.approx(own))
