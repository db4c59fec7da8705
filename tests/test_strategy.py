"""Flower's strategies with fedpneumo's tracking hooks (server_app/strategy.py).

The hooks are driven with real Flower objects: an in-memory Grid over a real
LinkState with registered nodes, and reply Messages in the ClientApp's format.
"""

from __future__ import annotations

import gc
import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from sqlalchemy import select

from client_app.messages import (
    EVAL_THRESHOLD,
    INFO_RECORD,
    RELAY_RECORD,
    REPLY_METRICS,
    TrainInstructions,
    encode_relay_rows,
    reply_metrics,
)
from client_app.model import build_model
from client_app.splits import make_synthetic
from client_app.trainer import lr_at
from persistence.db import get_engine, session_scope
from persistence.errors import FailedRunError
from persistence.models import Client, ClientEvaluation, ClientFailure, RunMetric
from persistence.repositories import MetricPoint
from server_app.choices import StrategyName
from server_app.compose import load_config
from server_app.config import AppConfig, strategy_class
from server_app.evaluate import ServerEvaluator
from server_app.factories import instructions, model_meta
from server_app.recorder import RunRecorder
from server_app.round_state import ROUND_STATE, load_round_state, save_round_state
from server_app.strategy import (
    STATE_ATTRIBUTES,
    TooFewRepliesError,
    TrackingMixin,
    make_strategy,
    nan_weighted_mean,
)
from tests.factories import federated_run

NUM_NODES = 3
OFFSET = 2  # resumed after round 2: Flower's round 1 is the run's round 3
WIDTH = 8


@pytest.fixture(scope="module", autouse=True)
def _settled_heap() -> Iterator[None]:
    # Flower's Bulyan runs a full gc.collect() per reply (~0.3 s each with
    # torch loaded); keep the objects that already exist out of those scans.
    gc.freeze()
    yield
    gc.unfreeze()


@dataclass
class Federation:
    grid: InMemoryGrid
    node_ids: list[int]


@pytest.fixture
def federation(monkeypatch: pytest.MonkeyPatch) -> Federation:
    """A real in-memory Grid with NUM_NODES registered, online nodes."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run_id = state.create_run(
        None,
        None,
        None,
        {},
        NOOP_FEDERATION_ID,
        None,
        NOOP_FLWR_AID,
        TaskType.SERVER_APP,
    )
    node_ids = []
    for _ in range(NUM_NODES):
        node_id = state.create_node(
            NOOP_FLWR_AID,
            NOOP_ACCOUNT_NAME,
            secrets.token_bytes(32),
            heartbeat_interval=HEARTBEAT_INTERVAL_INF,
        )
        state.acknowledge_node_heartbeat(
            node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF
        )
        node_ids.append(node_id)
    grid = InMemoryGrid(state_factory=factory)
    run = state.get_run_info(run_ids=[run_id])[0]
    grid.set_run(run)
    # The identity of the ServerApp process, as Flower's runtime sets it before
    # the ServerApp creates messages (flwr.superlink.runtime.run_serverapp).
    monkeypatch.setattr(TaskIdentity, "_task_id", run.primary_task_id)
    monkeypatch.setattr(TaskIdentity, "_run_id", run.run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    assert sorted(grid.get_node_ids()) == sorted(node_ids)
    return Federation(grid, node_ids)


@pytest.fixture
def recorder(sqlite_url: str, tmp_path: Path) -> RunRecorder:
    run_id = federated_run(sqlite_url, "strategies")
    return RunRecorder(sqlite_url, run_id, tmp_path / "runs" / str(run_id))


def tracked(
    name: str,
    recorder: RunRecorder,
    *overrides: str,
    round_offset: int = OFFSET,
    **attach: Any,
) -> tuple[Any, AppConfig]:
    """The strategy as federation._train builds and attaches it."""
    cfg = load_config([f"strategy={name}", f"model.width={WIDTH}", *overrides])
    strategy = make_strategy(cfg, NUM_NODES)
    settings: dict[str, Any] = {
        "min_success_fraction": cfg.strategy.min_success_fraction,
        "lr_schedule": str(cfg.train.lr_schedule),
        "num_rounds": cfg.num_rounds,
        **attach,
    }
    strategy.attach(
        recorder,
        instructions(cfg, recorder.run_id, recorder.url).to_config(),
        round_offset=round_offset,
        **settings,
    )
    return strategy, cfg


def model_arrays(seed: int, norm: str = "batch") -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(build_model("cnn", width=WIDTH, norm=norm).state_dict())


def train_reply(
    ins: Message,
    partition_id: int,
    *,
    seed: int,
    num_examples: int = 20,
    last_epoch: dict[str, float] | None = None,
    relay: Sequence[MetricPoint] = (),
    norm: str = "batch",
) -> Message:
    """A train reply exactly as client_app.app.train builds it."""
    if last_epoch is None:
        last_epoch = {k: 0.1 * (partition_id + 1) for k in REPLY_METRICS}
    content = RecordDict(
        {
            "arrays": model_arrays(seed, norm),
            "metrics": MetricRecord(reply_metrics(last_epoch, num_examples)),
            INFO_RECORD: ConfigRecord(
                {
                    "client-identifier": f"client-{partition_id}",
                    "partition-id": partition_id,
                    "num-examples": num_examples,
                }
            ),
        }
    )
    if relay:
        content[RELAY_RECORD] = ConfigRecord(encode_relay_rows(list(relay)))
    return Message(content=content, reply_to=ins)


def deployed_error(exc_type: str, text: str) -> str:
    """An error reason as a SuperNode reports a ClientApp exception."""
    return f"<class '{exc_type}'>:<'{text}'>"


def error_reply(ins: Message, reason: str) -> Message:
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    return Message(error, reply_to=ins)


def partition_of(federation: Federation, message: Message) -> int:
    return federation.node_ids.index(message.metadata.dst_node_id)


def configure(
    strategy: Any, server_round: int, arrays: ArrayRecord, federation: Federation
) -> list[Message]:
    return list(
        strategy.configure_train(server_round, arrays, ConfigRecord(), federation.grid)
    )


def run_round(
    strategy: Any,
    server_round: int,
    arrays: ArrayRecord,
    federation: Federation,
    seed: int,
) -> ArrayRecord:
    messages = configure(strategy, server_round, arrays, federation)
    # Flower samples nodes in random order; sum in partition order, so that
    # two runs of a round add the same floats in the same order.
    messages.sort(key=lambda m: partition_of(federation, m))
    replies = [train_reply(m, p, seed=seed + p) for p, m in enumerate(messages)]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return aggregated


def same_arrays(a: ArrayRecord, b: ArrayRecord) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k].numpy(), b[k].numpy()) for k in a
    )


def aggregate_rows(recorder: RunRecorder) -> list[RunMetric]:
    with session_scope(get_engine(recorder.url or "")) as db:
        return list(
            db.scalars(
                select(RunMetric)
                .where(RunMetric.client_id.is_(None))
                .order_by(RunMetric.round_number, RunMetric.metric_name)
            ).all()
        )


# Every strategy -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(StrategyName))
def test_make_strategy_subclasses_flowers_class(name: str) -> None:
    cfg = load_config([f"strategy={name}"])
    strategy = make_strategy(cfg, num_nodes=NUM_NODES)
    assert type(strategy).__name__ == f"Tracked{strategy_class(name).__name__}"
    assert isinstance(strategy, strategy_class(name))
    assert isinstance(strategy, TrackingMixin)
    for key, value in cfg.strategy.params.items():
        assert getattr(strategy, key) == value
    assert (strategy.min_train_nodes, strategy.min_available_nodes) == (3, 3)
    # Every hospital scores every round's model by default.
    assert (strategy.fraction_evaluate, strategy.min_evaluate_nodes) == (1.0, 3)
    assert strategy.train_metrics_aggr_fn is nan_weighted_mean
    assert strategy.evaluate_metrics_aggr_fn is nan_weighted_mean


@pytest.mark.parametrize("name", sorted(StrategyName))
def test_a_round_through_every_strategy(
    name: str, recorder: RunRecorder, federation: Federation
) -> None:
    strategy, cfg = tracked(name, recorder)
    norm = str(cfg.model.norm)  # qfedavg's config takes GroupNorm
    initial = model_arrays(0, norm)
    messages = configure(strategy, 1, initial, federation)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(
        federation.node_ids
    )
    replies = [
        train_reply(m, partition_of(federation, m), seed=10 + i, norm=norm)
        for i, m in enumerate(messages)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    assert list(arrays.keys()) == list(initial.keys())
    model = build_model("cnn", width=WIDTH, norm=norm)
    model.load_state_dict(arrays.to_torch_state_dict())  # a usable global model
    assert set(metrics) == set(REPLY_METRICS)
    # Clients reported 0.1, 0.2 and 0.3: any robust or weighted mean lies within.
    values = [float(v) for v in metrics.values()]  # type: ignore[arg-type]
    assert all(0.1 - 1e-9 <= v <= 0.3 + 1e-9 for v in values)

    assert recorder.replay_all(timeout_s=5) == 0
    rows = aggregate_rows(recorder)
    assert {r.round_number for r in rows} == {1 + OFFSET}
    assert sorted(r.metric_name for r in rows) == sorted(REPLY_METRICS)

    state = through_round_state(strategy.state(), recorder.run_dir)
    assert set(state) <= set(STATE_ATTRIBUTES)


# configure_train ------------------------------------------------------------


def test_configure_train_sends_the_run_id_and_settings(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, cfg = tracked("fedavg", recorder)
    initial = model_arrays(0)
    messages = configure(strategy, 1, initial, federation)
    assert len(messages) == NUM_NODES
    for message in messages:
        assert message.metadata.message_type == MessageType.TRAIN
        assert same_arrays(message.content["arrays"], initial)  # type: ignore[arg-type]
        ins = TrainInstructions.from_config(message.content["config"])
        assert ins.run_id == recorder.run_id
        assert ins.server_round == 1 + OFFSET  # continued, not Flower's 1
        assert ins.lr == cfg.train.lr
        assert (ins.model_width, ins.partition_name) == (WIDTH, "dirichlet")
        assert ins.db_url == recorder.url


def test_configure_train_sends_each_rounds_cosine_rate(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, cfg = tracked(
        "fedavg", recorder, lr_schedule="cosine", num_rounds=6, round_offset=0
    )
    rates = []
    for server_round in (1, 2, 3):
        (message, *_) = configure(strategy, server_round, model_arrays(0), federation)
        rates.append(message.content["config"]["lr"])
    assert rates == [lr_at(cfg.train.lr, "cosine", r, 6) for r in (1, 2, 3)]
    assert rates[0] == cfg.train.lr and rates[0] > rates[1] > rates[2]


def test_fedprox_also_sends_its_proximal_term(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedprox", recorder, "strategy.params.proximal_mu=0.3")
    (message, *_) = configure(strategy, 1, model_arrays(0), federation)
    assert message.content["config"]["proximal-mu"] == 0.3
    assert message.content["config"]["server-round"] == 1 + OFFSET


def test_a_fraction_of_the_nodes_is_sampled(
    recorder: RunRecorder, federation: Federation
) -> None:
    cfg = load_config(["strategy.fraction_train=0.5"])
    strategy = make_strategy(cfg, num_nodes=NUM_NODES)
    assert strategy.min_train_nodes == 2  # ceil(0.5 * 3)
    strategy.attach(recorder, instructions(cfg, recorder.run_id, None).to_config())
    messages = configure(strategy, 1, model_arrays(0), federation)
    assert len(messages) == 2
    assert {m.metadata.dst_node_id for m in messages} <= set(federation.node_ids)


@pytest.fixture
def evaluator(recorder: RunRecorder) -> ServerEvaluator:
    """The server's val evaluator, on a small generated val split."""
    cfg = load_config([f"model.width={WIDTH}"])
    val = make_synthetic(n_train=10, n_val=60, seed=1).split("val")
    return ServerEvaluator(
        cfg,
        build_model("cnn", width=WIDTH),
        val,
        recorder,
        recorder.run_dir,
        model_meta(cfg),
        round_offset=OFFSET,
    )


def configure_evaluate(
    strategy: Any, server_round: int, federation: Federation
) -> list[Message]:
    return list(
        strategy.configure_evaluate(
            server_round, model_arrays(server_round), ConfigRecord(), federation.grid
        )
    )


def test_configure_evaluate_sends_the_servers_threshold_to_every_hospital(
    recorder: RunRecorder, federation: Federation, evaluator: ServerEvaluator
) -> None:
    strategy, _ = tracked("fedavg", recorder, evaluator=evaluator)
    messages = configure_evaluate(strategy, 1, federation)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(
        federation.node_ids
    )
    # The server's own val score of the same model, chosen before Flower's
    # evaluate_fn runs; that call reuses it instead of scoring twice.
    server = evaluator.score(1, model_arrays(1))
    for message in messages:
        assert message.metadata.message_type == MessageType.EVALUATE
        config = message.content["config"]
        assert config[EVAL_THRESHOLD] == server["threshold"]
        ins = TrainInstructions.from_config(config)
        assert (ins.run_id, ins.server_round) == (recorder.run_id, 1 + OFFSET)
        assert same_arrays(message.content["arrays"], model_arrays(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "evaluated"),
    [
        (["evaluation.federated=false"], []),
        # Every 2nd round of the run (continued numbers), and the last one.
        (["evaluation.every=2", "num_rounds=6"], [2, 4]),
        (["evaluation.every=4", "num_rounds=5"], [2, 3]),
    ],
)
def test_evaluation_keys_thin_or_turn_off_the_hospitals_evaluation(
    overrides: list[str],
    evaluated: list[int],
    recorder: RunRecorder,
    federation: Federation,
    evaluator: ServerEvaluator,
) -> None:
    strategy, _ = tracked("fedavg", recorder, *overrides, evaluator=evaluator)
    asked = [r for r in (1, 2, 3, 4) if configure_evaluate(strategy, r, federation)]
    assert asked == evaluated
    assert strategy.aggregate_evaluate(1, []) is None


def test_a_fraction_of_the_hospitals_evaluates(
    recorder: RunRecorder, federation: Federation, evaluator: ServerEvaluator
) -> None:
    strategy, _ = tracked(
        "fedavg", recorder, "evaluation.fraction=0.5", evaluator=evaluator
    )
    assert strategy.min_evaluate_nodes == 2  # ceil(0.5 * 3)
    assert len(configure_evaluate(strategy, 1, federation)) == 2


def evaluate_reply(ins: Message, partition_id: int, auroc: float) -> Message:
    """An evaluate reply exactly as client_app.app.evaluate_global builds it."""
    metrics = {
        "loss": 0.4,
        "accuracy": 0.8,
        "precision": 0.75,
        "recall": 0.9,
        "f1_score": 0.82,
        "auroc": auroc,
        "true_positives": 9.0,
        "true_negatives": 7.0,
        "false_positives": 3.0,
        "false_negatives": 1.0,
        "num_samples": 20.0,
        "threshold": 0.4,
    }
    content = RecordDict(
        {
            "metrics": MetricRecord({**metrics, "num-examples": 20}),
            INFO_RECORD: ConfigRecord(
                {
                    "client-identifier": f"client-{partition_id}",
                    "partition-id": partition_id,
                    "num-examples": 180,
                }
            ),
        }
    )
    return Message(content=content, reply_to=ins)


def test_every_hospitals_score_is_stored_and_one_class_has_no_auroc(
    recorder: RunRecorder, federation: Federation, evaluator: ServerEvaluator
) -> None:
    strategy, _ = tracked("fedavg", recorder, evaluator=evaluator)
    messages = configure_evaluate(strategy, 1, federation)
    messages.sort(key=lambda m: partition_of(federation, m))
    replies = [
        evaluate_reply(messages[0], 0, 0.9),
        evaluate_reply(messages[1], 1, math.nan),  # a one-class slice
        error_reply(messages[2], RAY_REASON),
    ]
    aggregated = strategy.aggregate_evaluate(1, replies)
    assert aggregated is not None
    assert aggregated["auroc"] == pytest.approx(0.9)  # NaN left out, not 0
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        rows = db.execute(
            select(Client.client_identifier, Client.num_examples, ClientEvaluation)
            .join(Client, ClientEvaluation.client_id == Client.id)
            .order_by(Client.client_identifier)
        ).all()
        assert [(r[0], r[1]) for r in rows] == [("client-0", 180), ("client-1", 180)]
        first, second = (r[2] for r in rows)
        assert {first.round_number, second.round_number} == {1 + OFFSET}
        assert (first.auroc, second.auroc) == (0.9, None)
        assert (first.num_samples, first.threshold, first.true_positives) == (
            20,
            0.4,
            9,
        )
        failure = db.scalars(select(ClientFailure)).one()
        assert failure.round_number == 1 + OFFSET
        assert failure.reason.startswith("evaluation: DataError")


# aggregate_train -------------------------------------------------------------


def test_fedavg_weights_clients_by_their_examples(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder)
    messages = configure(strategy, 1, model_arrays(0), federation)
    replies = [
        train_reply(messages[0], 0, seed=1, num_examples=10),
        train_reply(messages[1], 1, seed=2, num_examples=30),
        error_reply(messages[2], deployed_error("MemoryError", "out of memory")),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    a, b = model_arrays(1), model_arrays(2)
    for key in a:
        expected = 0.25 * a[key].numpy() + 0.75 * b[key].numpy()
        assert np.allclose(arrays[key].numpy(), expected)
    # 0.1 from 10 examples and 0.2 from 30 examples.
    assert metrics["train_loss"] == pytest.approx(0.175)


def test_nan_metrics_do_not_spoil_the_aggregate(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder)
    messages = configure(strategy, 1, model_arrays(0), federation)
    replies = [
        # A one-class validation slice has no AUROC; nobody reported an F1.
        train_reply(
            messages[0], 0, seed=1, last_epoch={"train_loss": 1.0, "val_auroc": 0.8}
        ),
        train_reply(messages[1], 1, seed=2, last_epoch={"train_loss": 0.0}),
        train_reply(
            messages[2], 2, seed=3, last_epoch={"train_loss": 0.5, "val_auroc": 0.6}
        ),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["val_auroc"] == pytest.approx(0.7)
    assert metrics["train_loss"] == pytest.approx(0.5)
    assert math.isnan(metrics["val_f1_score"])  # type: ignore[arg-type]
    assert recorder.replay_all(timeout_s=5) == 0
    stored = {
        r.metric_name: (r.metric_value, r.is_nan) for r in aggregate_rows(recorder)
    }
    assert stored["val_auroc"][0] == pytest.approx(0.7)
    assert stored["val_f1_score"] == (None, True)


def test_nan_weighted_mean_of_records() -> None:
    records = [
        RecordDict({"m": MetricRecord({"x": 1.0, "y": math.nan, "num-examples": 1})}),
        RecordDict({"m": MetricRecord({"x": 4.0, "y": 2.0, "num-examples": 2})}),
    ]
    result = nan_weighted_mean(records, "num-examples")
    assert dict(result) == {"x": 3.0, "y": 2.0}


def test_relayed_rows_are_stored_under_their_client(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder, "tracking.client_writes=relay")
    messages = configure(strategy, 1, model_arrays(0), federation)
    relayed = messages[0]
    relay_pid = partition_of(federation, relayed)
    round_number = 1 + OFFSET
    points = [
        MetricPoint("train_loss", 0.6, 1, "train", round_number),
        MetricPoint("val_auroc", math.nan, 1, "val", round_number),
        MetricPoint("train_loss", 0.4, 2, "train", round_number),
    ]
    replies = [
        train_reply(relayed, relay_pid, seed=1, num_examples=44, relay=points),
        *(
            train_reply(m, partition_of(federation, m), seed=2 + i)
            for i, m in enumerate(messages[1:])
        ),
    ]
    strategy.aggregate_train(1, replies)
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        client = db.scalars(select(Client)).one()  # the others write themselves
        assert client.client_identifier == f"client-{relay_pid}"
        assert client.partition_id == relay_pid
        assert client.node_id == str(relayed.metadata.dst_node_id)
        assert client.num_examples == 44
        rows = db.scalars(
            select(RunMetric)
            .where(RunMetric.client_id == client.id)
            .order_by(RunMetric.step, RunMetric.metric_name)
        ).all()
        assert [
            (r.round_number, r.step, r.metric_name, r.metric_value, r.is_nan)
            for r in rows
        ] == [
            (round_number, 1, "train_loss", 0.6, False),
            (round_number, 1, "val_auroc", None, True),
            (round_number, 2, "train_loss", 0.4, False),
        ]


RAY_REASON = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
    "Exception ClientAppException occurred. Message: "
    "ray::ClientAppActor.run() (pid=99, ip=127.0.0.1)\n"
    '  File "/work/main/client_app/app.py", line 57, in train\n'
    "client_app.data.DataError: data.path '/data/site-b' does not exist\n"
    "\nThe above exception was the direct cause of the following exception:\n\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: data.path'>"
)


def test_a_failed_client_is_recorded_by_name_with_a_concise_reason(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder)
    arrays = run_round(strategy, 1, model_arrays(0), federation, seed=1)
    messages = configure(strategy, 2, arrays, federation)
    failing = messages[0]
    replies = [
        error_reply(failing, RAY_REASON),
        *(
            train_reply(m, partition_of(federation, m), seed=5 + i)
            for i, m in enumerate(messages[1:])
        ),
    ]
    aggregated, _ = strategy.aggregate_train(2, replies)
    assert aggregated is not None  # 2 of 3 replied: enough
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        failure = db.scalars(select(ClientFailure)).one()
        assert failure.round_number == 2 + OFFSET
        assert failure.node_id == str(failing.metadata.dst_node_id)
        # Known from its reply in round 1.
        assert (
            failure.client_identifier == f"client-{partition_of(federation, failing)}"
        )
        assert failure.reason == "DataError: data.path '/data/site-b' does not exist"


def test_too_few_replies_fail_the_run_with_the_reasons(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder)
    messages = configure(strategy, 1, model_arrays(0), federation)
    first, second, third = messages
    replies = [
        error_reply(first, deployed_error("client_app.data.DataError", "no images")),
        error_reply(second, deployed_error("MemoryError", "CUDA out of memory")),
        train_reply(third, partition_of(federation, third), seed=1),
    ]
    with pytest.raises(TooFewRepliesError) as info:
        strategy.aggregate_train(1, replies)
    assert isinstance(info.value, FailedRunError)
    message = str(info.value)
    assert message.startswith(
        f"round {1 + OFFSET}: only 1 of 3 clients replied (need 2); failed: "
    )
    assert f"node {first.metadata.dst_node_id} (DataError: no images)" in message
    assert (
        f"node {second.metadata.dst_node_id} (MemoryError: CUDA out of memory)"
        in message
    )
    # The failures are on record even though the run stops here.
    assert recorder.replay_all(timeout_s=5) == 0
    with session_scope(get_engine(recorder.url or "")) as db:
        failures = db.scalars(select(ClientFailure)).all()
        assert {(f.round_number, f.node_id) for f in failures} == {
            (1 + OFFSET, str(first.metadata.dst_node_id)),
            (1 + OFFSET, str(second.metadata.dst_node_id)),
        }
    assert aggregate_rows(recorder) == []


def test_min_success_fraction_one_needs_every_client(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder, min_success_fraction=1.0)
    messages = configure(strategy, 1, model_arrays(0), federation)
    replies = [
        train_reply(m, partition_of(federation, m), seed=i)
        for i, m in enumerate(messages[:-1])
    ]
    replies.append(error_reply(messages[-1], deployed_error("OSError", "disk full")))
    with pytest.raises(TooFewRepliesError, match="only 2 of 3 clients replied"):
        strategy.aggregate_train(1, replies)


def test_clients_that_never_reply_count_as_missing(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder)
    messages = configure(strategy, 1, model_arrays(0), federation)
    # Two of the three sampled clients time out: Flower hands back one reply.
    reply = train_reply(messages[0], partition_of(federation, messages[0]), seed=0)
    with pytest.raises(TooFewRepliesError, match="only 1 of 3 clients replied"):
        strategy.aggregate_train(1, [reply])


def test_a_round_without_any_reply_fails(recorder: RunRecorder) -> None:
    strategy, _ = tracked("fedavg", recorder)
    with pytest.raises(TooFewRepliesError, match="only 0 of 0 clients replied"):
        strategy.aggregate_train(1, [])


# Resume ---------------------------------------------------------------------


def through_round_state(state: dict, folder: Path) -> dict:
    """The strategy state as a resumed run reads it back from its round checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ROUND_STATE
    save_round_state(path, model_arrays(0), 1, {"strategy_state": state})
    return load_round_state(path)["strategy_state"]


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_restored_state_continues_the_same_optimisation(
    name: str, recorder: RunRecorder, federation: Federation
) -> None:
    first, _ = tracked(name, recorder, round_offset=0)
    after_one = run_round(first, 1, model_arrays(0), federation, seed=10)
    saved = through_round_state(first.state(), recorder.run_dir)
    assert saved and set(saved) <= set(STATE_ATTRIBUTES)
    expected = run_round(first, 2, after_one, federation, seed=20)

    resumed, _ = tracked(name, recorder, round_offset=1)
    resumed.restore(saved)
    assert same_arrays(run_round(resumed, 1, after_one, federation, seed=20), expected)

    # Without the state the optimiser starts over: another model.
    fresh, _ = tracked(name, recorder, round_offset=1)
    assert not same_arrays(
        run_round(fresh, 1, after_one, federation, seed=20), expected
    )


def test_fedavg_has_no_cross_round_state(
    recorder: RunRecorder, federation: Federation
) -> None:
    strategy, _ = tracked("fedavg", recorder)
    run_round(strategy, 1, model_arrays(0), federation, seed=1)
    assert strategy.state() == {}
