"""What the server sends clients and what they send back (client_app/messages.py)."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
from flwr.app import ConfigRecord, MetricRecord

from client_app.messages import (
    NUM_EXAMPLES,
    REPLY_METRICS,
    TrainInstructions,
    decode_relay_rows,
    encode_relay_rows,
    reply_metrics,
)
from persistence.repositories import MetricPoint
from server_app.compose import load_config
from server_app.factories import instructions


@pytest.fixture(scope="module")
def ins() -> TrainInstructions:
    return instructions(load_config([]), run_id=7, url=None)


def test_instructions_round_trip_through_a_config_record(
    ins: TrainInstructions,
) -> None:
    record = ConfigRecord(ins.to_config())
    assert TrainInstructions.from_config(record) == ins


def test_instructions_use_kebab_case_keys_on_the_wire(
    ins: TrainInstructions,
) -> None:
    config = ins.to_config()
    assert set(config) == {f.name.replace("_", "-") for f in fields(ins)}
    assert config["run-id"] == 7
    assert config["server-round"] == 0
    assert config["partition-seed"] == 42  # partition.seed null: the run's seed


def test_instructions_carry_the_configured_settings() -> None:
    cfg = load_config(
        ["train.lr=0.05", "model.width=8", "partition=iid", "partition.seed=9"]
    )
    ins = instructions(cfg, run_id=3, url="sqlite:////tmp/tracking.db")
    assert (ins.lr, ins.model_width, ins.partition_name) == (0.05, 8, "iid")
    assert ins.partition_seed == 9
    assert ins.db_url == "sqlite:////tmp/tracking.db"


@pytest.mark.parametrize("missing", ["run-id", "db-url", "client-val-fraction"])
def test_a_missing_key_is_named(ins: TrainInstructions, missing: str) -> None:
    config = ins.to_config()
    del config[missing]
    with pytest.raises(ValueError, match=f"lacks '{missing}'"):
        TrainInstructions.from_config(ConfigRecord(config))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://fed:s3cret@db.example:5432/tracking",
        "postgres://fed:s3cret@localhost/tracking",
    ],
)
def test_a_url_with_a_password_is_never_sent(url: str) -> None:
    ins = instructions(load_config([]), run_id=7, url=url)
    assert ins.db_url == ""
    assert not any("s3cret" in str(v) for v in ins.to_config().values())


def test_instructions_differing_in_one_field_are_not_equal(
    ins: TrainInstructions,
) -> None:
    other = TrainInstructions.from_config(
        ConfigRecord(replace(ins, lr=ins.lr * 2).to_config())
    )
    assert other != ins and other.lr == ins.lr * 2


def _points() -> list[MetricPoint]:
    return [
        MetricPoint("train_loss", 0.75, 1, "train", 3),
        MetricPoint("val_auroc", math.nan, 1, "val", 3),
        MetricPoint("val_loss", math.inf, 2, "val", 3),
        MetricPoint("final_val_auroc", 0.5, 0, "val", None),
    ]


def test_relay_rows_round_trip_through_a_config_record() -> None:
    points = _points()
    record = ConfigRecord(encode_relay_rows(points))
    decoded = decode_relay_rows(record)
    assert len(decoded) == len(points)
    for got, sent in zip(decoded, points, strict=True):
        assert got.metric_name == sent.metric_name
        assert got.step == sent.step
        assert got.dataset_type == sent.dataset_type
        assert got.round_number == sent.round_number
        if math.isnan(sent.value):
            assert math.isnan(got.value)
        else:
            assert got.value == sent.value


def test_relay_rows_are_flat_lists_of_one_type_each() -> None:
    columns = encode_relay_rows(_points())
    assert columns["rounds"] == [3, 3, 3, -1]  # no round travels as -1
    for values in columns.values():
        assert isinstance(values, list) and len({type(v) for v in values}) == 1


def test_no_relay_rows_encode_to_empty_lists() -> None:
    assert decode_relay_rows(ConfigRecord(encode_relay_rows([]))) == []


def test_reply_metrics_have_the_fixed_key_set() -> None:
    last_epoch = {
        "train_loss": 0.4,
        "val_auroc": 0.8,
        "val_precision": 0.7,  # not part of the reply
    }
    metrics = reply_metrics(last_epoch, num_examples=57)
    assert list(metrics) == [*REPLY_METRICS, NUM_EXAMPLES]
    assert metrics["train_loss"] == 0.4 and metrics["val_auroc"] == 0.8
    missing = set(REPLY_METRICS) - {"train_loss", "val_auroc"}
    assert all(math.isnan(metrics[k]) for k in missing)
    assert metrics[NUM_EXAMPLES] == 57 and isinstance(metrics[NUM_EXAMPLES], int)
    # Flower takes it as a MetricRecord as is.
    assert MetricRecord(metrics)[NUM_EXAMPLES] == 57


def test_two_clients_reply_with_identical_keys() -> None:
    a = reply_metrics({"train_loss": 1.0}, 10)
    b = reply_metrics({"val_f1_score": 0.3, "val_accuracy": 0.9}, 20)
    assert set(a) == set(b)
