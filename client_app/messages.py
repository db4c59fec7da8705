"""What the server sends clients each round and what clients send back.

Both sides import this module, so the message keys are defined exactly once.
Flower records hold only scalars and lists, so everything here is flat.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from persistence.entries import points_from_columns, points_to_columns
from persistence.repositories import MetricPoint

# Keys of every train reply's MetricRecord: identical on all clients, as
# Flower's aggregation requires; a metric a client cannot compute is NaN.
REPLY_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_auroc",
    "val_f1_score",
)
NUM_EXAMPLES = "num-examples"  # Flower's weighting key, kept as Flower spells it
INFO_RECORD = "info"
# A query reply: how many negative and positive training images a client holds.
COUNTS_RECORD = "label-counts"
RELAY_RECORD = "relay"
# An evaluate instruction: the decision threshold the server chose on val
# this round, so every hospital's accuracy and F1 use the same cut.
EVAL_THRESHOLD = "threshold"


@dataclass
class TrainInstructions:
    """Per-round instructions in the train ConfigRecord (kebab-case on the wire)."""

    run_id: int
    server_round: int
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    # Weight of the positive class: negatives/positives over every client's
    # training labels (the counts they report before round 1); 0 = unweighted.
    pos_weight: float
    augment: bool
    device: str
    seed: int
    num_threads: int
    model_name: str
    model_width: int
    model_dropout: float
    model_norm: str
    data_path: str  # "" = the MedMNIST cache/download
    data_limit: int  # 0 = all
    image_size: int
    partition_name: str
    partition_alpha: float
    partition_classes: int
    partition_min_size: int
    partition_seed: int
    client_val_fraction: float
    outputs_dir: str
    client_writes: str
    enable_db: bool
    db_url: str  # "" = the client's own DATABASE_URL (never a password here)
    # privacy.mode: client_fixed / client_adaptive make the client clip its
    # update with Flower's mod (the server sends the clipping norm).
    privacy: str

    def to_config(self) -> dict[str, Any]:
        """Return the record contents."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, record: Any) -> TrainInstructions:
        """Read instructions from a received ConfigRecord."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                raise ValueError(f"train config from the server lacks {key!r}")
            values[f.name] = record[key]
        return cls(**values)


def encode_relay_rows(points: list[MetricPoint]) -> dict[str, Any]:
    """Pack metric points as parallel lists for a ConfigRecord."""
    return points_to_columns(points)


def decode_relay_rows(record: Any) -> list[MetricPoint]:
    """Unpack metric points sent by ``encode_relay_rows``."""
    return points_from_columns(record)


def reply_metrics(last_epoch: dict[str, float], num_examples: int) -> dict[str, Any]:
    """Return a train reply's MetricRecord contents with the fixed key set."""
    metrics: dict[str, Any] = {
        key: float(last_epoch.get(key, math.nan)) for key in REPLY_METRICS
    }
    metrics[NUM_EXAMPLES] = int(num_examples)
    return metrics
