"""The Flower ClientApp: thin handlers over the plain PyTorch trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client_app.data import Split
from client_app.messages import (
    COUNTS_RECORD,
    EVAL_THRESHOLD,
    INFO_RECORD,
    NUM_EXAMPLES,
    RELAY_RECORD,
    TrainInstructions,
    encode_relay_rows,
    reply_metrics,
)
from client_app.metrics_collector import MetricsCollectorCallback
from client_app.model import build_model
from client_app.partition import PartitionSpec, client_split
from client_app.trainer import TrainSettings, evaluate, fit
from persistence.db import database_url_from_env
from persistence.errors import InputError

log = logging.getLogger(__name__)


def privacy_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Clip this client's update with Flower's mod when the run asks for it.

    ``privacy=client_fixed`` / ``client_adaptive`` runs get Flower's
    ``fixedclipping_mod`` / ``adaptiveclipping_mod`` on their train messages
    (the server's DP wrapper sends the clipping norm); every other message
    passes through untouched.
    """
    if msg.metadata.message_type == MessageType.TRAIN:
        mod = CLIPPING_MODS.get(str(msg.content["config"].get("privacy", "none")))
        if mod is not None:
            return mod(msg, context, call_next)
    return call_next(msg, context)


CLIPPING_MODS = {
    "client_fixed": fixedclipping_mod,
    "client_adaptive": adaptiveclipping_mod,
}
app = ClientApp(mods=[privacy_mod])


def _direct_url(ins: TrainInstructions) -> str:
    """The database a client writes to itself: never a silent local fallback."""
    url = ins.db_url or database_url_from_env()
    if not url:
        raise InputError(
            "tracking.client_writes=direct needs DATABASE_URL on this SuperNode "
            "(the server never sends database passwords); set it, or use "
            "tracking.client_writes=relay"
        )
    return url


def client_identifier(partition_id: int) -> str:
    """Return the name a hospital has in the database (``client-<partition>``)."""
    return f"client-{partition_id}"


def outputs_folder(ins: TrainInstructions, context: Context) -> Path:
    """This node's outputs folder: its own (node config outputs-dir) or the run's."""
    return Path(str(context.node_config.get("outputs-dir") or ins.outputs_dir))


def make_collector(
    ins: TrainInstructions, context: Context, partition_id: int, num_examples: int
) -> MetricsCollectorCallback:
    """Attach the collector to the server's run id for this client and round."""
    identifier = client_identifier(partition_id)
    outputs_dir = outputs_folder(ins, context)
    relay = ins.client_writes == "relay"
    return MetricsCollectorCallback(
        outputs_dir / "runs" / str(ins.run_id) / "clients" / identifier,
        run_id=ins.run_id,
        training_mode="federated",
        enable_db_persistence=ins.enable_db,
        database_url=None if relay or not ins.enable_db else _direct_url(ins),
        client_identifier=identifier,
        round_number=ins.server_round,
        partition_id=partition_id,
        node_id=context.node_id,
        num_examples=num_examples,
        relay=relay,
        # A down database must not stall the round: the server replays later.
        flush_timeout_s=0,
    )


def train_settings(
    ins: TrainInstructions, partition_id: int, mu: float
) -> TrainSettings:
    """Return the trainer's settings for this round on this client."""
    return TrainSettings(
        epochs=ins.local_epochs,
        batch_size=ins.batch_size,
        lr=ins.lr,
        optimizer=ins.optimizer,
        weight_decay=ins.weight_decay,
        # From every client's training label counts (never validation's).
        pos_weight=ins.pos_weight or None,
        proximal_mu=mu,
        augment=ins.augment,
        device=ins.device,
        # Distinct, reproducible shuffles per client and round.
        seed=ins.seed * 100_003 + partition_id * 1_009 + ins.server_round,
    )


def local_data(ins: TrainInstructions, context: Context) -> tuple[Split, Split]:
    """Return this hospital's (train, local validation) data."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    # A SuperNode may hold its own copy of the data (--node-config data-path=...).
    data_path = str(context.node_config.get("data-path") or ins.data_path)
    spec = PartitionSpec.from_instructions(ins, num_partitions, data_path)
    return client_split(spec, partition_id, outputs_folder(ins, context))


@app.query()
def label_counts(msg: Message, context: Context) -> Message:
    """Report how many negative and positive training images this client holds.

    Counts only: the server sums them into the positive-class weight that
    every client uses, so the loss is weighted the same everywhere.
    """
    ins = TrainInstructions.from_config(msg.content["config"])
    train_split, _ = local_data(ins, context)
    positives = int(train_split.labels.sum())
    counts = {"negatives": len(train_split) - positives, "positives": positives}
    return Message(RecordDict({COUNTS_RECORD: MetricRecord(counts)}), reply_to=msg)


def received_model(msg: Message, ins: TrainInstructions) -> torch.nn.Module:
    """Build the model the instructions name, with the message's weights."""
    torch.set_num_threads(max(ins.num_threads, 1))
    model = build_model(
        ins.model_name,
        width=ins.model_width,
        dropout=ins.model_dropout,
        norm=ins.model_norm,
    )
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def client_info(context: Context, num_examples: int) -> ConfigRecord:
    """Return who replies: identifier and partition (kept out of the metrics)."""
    partition_id = int(context.node_config["partition-id"])
    return ConfigRecord(
        {
            "client-identifier": client_identifier(partition_id),
            "partition-id": partition_id,
            "num-examples": num_examples,
        }
    )


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global model on the slice of this hospital's data kept aside.

    The threshold is the server's, chosen on val this round, so accuracy and
    F1 compare across hospitals. AUROC is NaN when the slice holds one class.
    """
    config = msg.content["config"]
    ins = TrainInstructions.from_config(config)
    train_split, held_out = local_data(ins, context)
    model = received_model(msg, ins)
    metrics = evaluate(
        model, held_out, threshold=float(config[EVAL_THRESHOLD]), device=ins.device
    )
    content = RecordDict(
        {
            "metrics": MetricRecord({**metrics, NUM_EXAMPLES: len(held_out)}),
            INFO_RECORD: client_info(context, len(train_split)),
        }
    )
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's partition."""
    ins = TrainInstructions.from_config(msg.content["config"])
    partition_id = int(context.node_config["partition-id"])
    train_split, val_split = local_data(ins, context)
    model = received_model(msg, ins)
    collector = make_collector(ins, context, partition_id, len(train_split))
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    settings = train_settings(ins, partition_id, mu)
    result = fit(model, train_split, val_split, settings, callbacks=[collector])

    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                reply_metrics(result.history[-1], len(train_split))
            ),
            INFO_RECORD: client_info(context, len(train_split)),
        }
    )
    if collector.relay:
        points = [p for batch in collector.relay_batches for p in batch.points]
        content[RELAY_RECORD] = ConfigRecord(encode_relay_rows(points))
    return Message(content=content, reply_to=msg)
