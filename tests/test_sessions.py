"""Whole federated sessions (``run_session``) over the in-process loopback grid.

Every strategy runs the real ServerApp session against the real ClientApp
and a real SQLite file; only Flower's transport is replaced (tests/loopback.py).
The same sessions through `flwr run` and Ray are in tests/test_federated.py.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from threading import get_ident
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from sqlalchemy import func, select

from client_app.app import app as client_app
from client_app.app import evaluate_global, label_counts, train
from client_app.data import load_data
from client_app.partition import PartitionSpec, client_split
from client_app.trainer import evaluate, restore_model
from persistence.db import dispose_engines, get_engine, session_scope
from persistence.models import (
    Client,
    ClientEvaluation,
    ClientFailure,
    Run,
    RunMetric,
    ServerEvaluation,
    TestEvaluation,
)
from server_app.choices import StrategyName
from server_app.compose import load_config, resolve_paths
from server_app.factories import instructions
from server_app.federation import global_pos_weight, run_session
from server_app.strategy import TooFewRepliesError
from tests.loopback import RUN_ID, LoopbackGrid, serverapp_identity

NUM_NODES = 3


def session(
    tmp_path: Path,
    data_file: Path,
    *overrides: str,
    app: ClientApp = client_app,
    grid: LoopbackGrid | None = None,
) -> str:
    """Run one whole session in-process; return the tracking database URL."""
    out = tmp_path / "out"
    args = [
        f"data.path={data_file}",
        "data.limit=200",
        "model.width=8",
        f"simulation.num_supernodes={NUM_NODES}",
        "num_rounds=2",
        f"outputs_dir={out}",
        *overrides,
    ]
    context = Context(
        run_id=RUN_ID,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"overrides": shlex.join(args), "resume-run-id": 0},
    )
    with serverapp_identity():
        run_session(grid or LoopbackGrid(app, NUM_NODES), context)
    return f"sqlite:///{out / 'fedpneumo.db'}"


@pytest.mark.parametrize("strategy", sorted(StrategyName))
def test_every_strategy_completes_a_session(
    strategy: str, tmp_path: Path, data_file: Path
) -> None:
    url = session(tmp_path, data_file, f"strategy={strategy}")
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert (run.strategy, run.status) == (strategy, "completed")
        assert run.rounds_completed == 2 and run.flwr_run_id == str(RUN_ID)
        rounds = s.scalars(
            select(ServerEvaluation.round_number).where(
                ServerEvaluation.run_id == run.id
            )
        ).all()
        assert sorted(rounds) == [0, 1, 2]
        assert Path(run.final_model_path).is_file()
        assert hospital_rounds(s, run.id) == {
            (f"client-{p}", r) for p in range(NUM_NODES) for r in (1, 2)
        }
        # No test split in the data: no test score is claimed.
        assert s.scalars(select(TestEvaluation)).all() == []
    dispose_engines()


def hospital_rounds(s: Any, run_id: int) -> set[tuple[str, int]]:
    """Return the (hospital, round) pairs of a run's client_evaluations rows."""
    rows = s.execute(
        select(Client.client_identifier, ClientEvaluation.round_number)
        .join(Client, ClientEvaluation.client_id == Client.id)
        .where(ClientEvaluation.run_id == run_id)
    ).all()
    assert len(rows) == len(set(rows)), "duplicate hospital rows"
    return {tuple(r) for r in rows}


def test_hospitals_score_with_the_servers_val_threshold_of_the_round(
    tmp_path: Path, data_file: Path
) -> None:
    url = session(tmp_path, data_file, "num_rounds=3", "evaluation.every=2")
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        # Every 2nd round and the last one.
        assert {r for _, r in hospital_rounds(s, run.id)} == {2, 3}
        thresholds = dict(
            s.execute(
                select(ServerEvaluation.round_number, ServerEvaluation.threshold)
            ).all()
        )
        for ev in s.scalars(select(ClientEvaluation)):
            assert ev.threshold == thresholds[ev.round_number]
            total = ev.true_positives + ev.true_negatives
            total += ev.false_positives + ev.false_negatives
            assert total == ev.num_samples > 0
    dispose_engines()


def test_a_session_on_data_with_a_test_split_scores_the_kept_model_once(
    tmp_path: Path, data_with_test: Path
) -> None:
    url = session(tmp_path, data_with_test, "evaluation.federated=false")
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert s.scalars(select(ClientEvaluation)).all() == []
        test = s.scalars(select(TestEvaluation)).one()
        best = s.scalars(
            select(ServerEvaluation).order_by(ServerEvaluation.auroc.desc())
        ).first()
        assert best is not None
        assert (test.run_id, test.round_number) == (run.id, best.round_number)
        assert test.threshold == best.threshold  # val's, never chosen on test
        model, state = restore_model(Path(run.checkpoint_path))
    # The same 200 test images the session loaded (data.limit, seed 42).
    test_split = load_data(str(data_with_test), limit=200, seed=42).split("test")
    expected = evaluate(model, test_split, threshold=float(state["threshold"]))
    assert test.num_samples == 200
    assert test.auroc == pytest.approx(expected["auroc"])
    assert test.accuracy == pytest.approx(expected["accuracy"])
    dispose_engines()


def failing_client(partition_id: int, server_round: int) -> ClientApp:
    """Our ClientApp, except that one client raises in one round's training."""

    def fail(msg: Message, context: Context, call_next: Any) -> Message:
        here = (
            int(context.node_config["partition-id"]),
            msg.content["config"]["server-round"],
        )
        training = msg.metadata.message_type == "train"
        if training and here == (partition_id, server_round):
            raise RuntimeError(f"injected fault in round {server_round}")
        return call_next(msg, context)

    app = ClientApp(mods=[fail])
    app.train()(train)
    app.evaluate()(evaluate_global)
    app.query()(label_counts)
    return app


def test_failing_client_is_recorded_and_the_session_completes(
    tmp_path: Path, data_file: Path
) -> None:
    url = session(tmp_path, data_file, app=failing_client(1, 2))
    with session_scope(get_engine(url)) as s:
        assert s.scalars(select(Run.status)).one() == "completed"
        failure = s.scalars(select(ClientFailure)).one()
        assert (failure.round_number, failure.client_identifier) == (2, "client-1")
        assert "injected fault in round 2" in failure.reason
    dispose_engines()


def test_too_few_replies_fail_the_session_with_the_reason(
    tmp_path: Path, data_file: Path
) -> None:
    with pytest.raises(TooFewRepliesError, match="round 1: only 2 of 3 clients"):
        session(
            tmp_path,
            data_file,
            "strategy.min_success_fraction=1.0",
            app=failing_client(2, 1),
        )
    url = f"sqlite:///{tmp_path / 'out' / 'fedpneumo.db'}"
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed" and run.end_time is not None
        assert "TooFewRepliesError: round 1: only 2 of 3" in run.error_message
        assert "injected fault in round 1" in run.error_message
    dispose_engines()


def test_clients_report_label_counts_for_one_global_class_weight(
    tmp_path: Path, data_file: Path
) -> None:
    cfg = resolve_paths(
        load_config(
            [
                f"data.path={data_file}",
                "data.limit=200",
                f"simulation.num_supernodes={NUM_NODES}",
            ]
        )
    )
    ins = instructions(cfg, run_id=1, url=None)
    grid = LoopbackGrid(client_app, NUM_NODES)
    threads: list[int] = []
    with serverapp_identity():
        weight = global_pos_weight(
            grid, ins.to_config(), meanwhile=lambda: threads.append(get_ident())
        )
    spec = PartitionSpec.from_instructions(ins, NUM_NODES, str(data_file))
    labels = np.concatenate([client_split(spec, i)[0].labels for i in range(3)])
    assert weight == pytest.approx((labels == 0).sum() / (labels == 1).sum())
    assert 0.2 < weight < 0.6  # about 26 % normal images: neg/pos near 0.35
    # The server's own work (scoring the initial model) ran beside the query,
    # and its failure is the query's failure.
    assert len(threads) == 1 and threads[0] != get_ident()

    def broken() -> None:
        raise RuntimeError("scoring failed")

    with serverapp_identity(), pytest.raises(RuntimeError, match="scoring failed"):
        global_pos_weight(grid, ins.to_config(), meanwhile=broken)


def test_a_diverging_session_fails_with_the_clients_reason(
    tmp_path: Path, data_file: Path
) -> None:
    diverge = ("model.norm=none", "train.optimizer=sgd", "train.lr=1e6")
    with pytest.raises(TooFewRepliesError, match="training diverged at epoch 1"):
        session(tmp_path, data_file, *diverge, "train.batch_size=8", "num_rounds=1")
    with session_scope(get_engine(session_url(tmp_path))) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "failed" and run.end_time is not None
        reason = run.error_message or ""
        assert "TrainingDivergedError" in reason
        assert "training diverged at epoch 1: train loss is nan" in reason
    dispose_engines()


def session_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'out' / 'fedpneumo.db'}"


def client_rows(url: str) -> tuple[dict[tuple[Any, ...], Any], int, set[Any]]:
    """A run's per-client values by key, its metric row count, its clients.

    The values are its metric rows and its hospitals' scores of the global model.
    """
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        assert run.status == "completed"
        rows = s.execute(
            select(
                Client.client_identifier,
                RunMetric.round_number,
                RunMetric.metric_name,
                RunMetric.step,
                RunMetric.dataset_type,
                RunMetric.metric_value,
                RunMetric.is_nan,
            ).join(Client, RunMetric.client_id == Client.id)
        ).all()
        total = s.scalar(select(func.count()).select_from(RunMetric))
        clients = {
            (c.client_identifier, c.partition_id, c.num_examples)
            for c in s.scalars(select(Client))
        }
        scores = s.execute(
            select(
                Client.client_identifier,
                ClientEvaluation.round_number,
                ClientEvaluation.auroc,
                ClientEvaluation.accuracy,
            ).join(Client, ClientEvaluation.client_id == Client.id)
        ).all()
    values = {tuple(r[:5]): (r[5], r[6]) for r in rows}
    assert len(values) == len(rows), "duplicate per-client metric rows"
    assert len(scores) == NUM_NODES * 2, scores  # every hospital, every round
    for name, rnd, auroc, accuracy in scores:
        values[name, rnd, "hospital_auroc", 0, "eval"] = (auroc, auroc is None)
        values[name, rnd, "hospital_accuracy", 0, "eval"] = (accuracy, False)
    return values, int(total or 0), clients


def test_relay_and_direct_store_the_same_rows(tmp_path: Path, data_file: Path) -> None:
    results = {}
    for mode in ("direct", "relay"):
        url = session(tmp_path / mode, data_file, f"tracking.client_writes={mode}")
        results[mode] = client_rows(url)
        spools = list((tmp_path / mode / "out" / "runs").glob("*/clients/*/spool"))
        # Direct clients spool their own writes; relaying clients write nothing.
        assert bool(spools) == (mode == "direct"), spools
        dispose_engines()
    direct, direct_total, direct_clients = results["direct"]
    relay, relay_total, relay_clients = results["relay"]
    assert {k[0] for k in direct} == {f"client-{i}" for i in range(NUM_NODES)}
    assert {k[1] for k in direct} == {1, 2}
    assert set(relay) == set(direct)
    assert relay_total == direct_total
    assert relay_clients == direct_clients
    # Same seed, CPU: the same numbers, NaN included (timings aside).
    for key, (value, is_nan) in direct.items():
        if "seconds" in key[2]:
            continue
        relayed, relayed_nan = relay[key]
        assert relayed_nan == is_nan, key
        assert is_nan or math.isclose(relayed, value, rel_tol=1e-6), key
