"""A minimal Flower app: what a user would write without fedpneumo.

FedAvg over the same small CNN, data and Dirichlet(0.5) partition as
fedpneumo's defaults. Each client trains one local epoch with a plain PyTorch
loop over in-memory tensors (AdamW, batch 64) and scores the global model on
the slice of its partition it keeps aside; the server scores each round's
model on val. Nothing is tracked: no database, no files, no checkpoints.
With the run-config key channels-last=1 the model computes in CPU's
channels-last layout, as fedpneumo's trainer does.
Each server evaluation prints ``peer-round N <unix time>`` so that the
benchmark can time rounds.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from sklearn.metrics import roc_auc_score
from torch import nn

from client_app.data import Split, load_data
from client_app.model import build_model
from client_app.partition import PartitionSpec, client_split

BATCH_SIZE = 64
LR = 1e-3

client = ClientApp()
server = ServerApp()


def tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as normalised float images and float labels."""
    images = torch.from_numpy(split.images).unsqueeze(1)
    return (images.float() / 255.0 - 0.5) / 0.5, torch.from_numpy(split.labels).float()


def train_epochs(model: nn.Module, split: Split, epochs: int, seed: int) -> float:
    """Train in place with a plain loop; return the last epoch's mean loss."""
    images, labels = tensors(split)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total = torch.zeros(())
    for _ in range(epochs):
        total = torch.zeros(())
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH_SIZE):
            rows = order[start : start + BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images[rows]), labels[rows])
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
    return float(total) / max(len(labels), 1)


@torch.no_grad()
def score(model: nn.Module, split: Split) -> dict[str, float]:
    """AUROC (NaN for one class) and accuracy at 0.5 of a model on a split."""
    images, labels = tensors(split)
    model.eval()
    probs = torch.sigmoid(model(images)).numpy()
    truth = split.labels
    auroc = roc_auc_score(truth, probs) if len(np.unique(truth)) == 2 else np.nan
    accuracy = float(((probs >= 0.5) == truth).mean())
    return {"auroc": float(auroc), "accuracy": accuracy}


def local(context: Context, data_path: str, seed: int) -> tuple[Split, Split]:
    """This client's (train, held-out) data: fedpneumo's default partition."""
    spec = PartitionSpec(
        data_path=data_path,
        limit=None,
        image_size=28,
        seed=seed,
        name="dirichlet",
        alpha=0.5,
        classes_per_client=1,
        min_partition_size=10,
        num_partitions=int(context.node_config["num-partitions"]),
        partition_seed=seed,
        val_fraction=0.1,
    )
    return client_split(spec, int(context.node_config["partition-id"]))


def laid_out(model: nn.Module, context: Context) -> nn.Module:
    """The model channels-last when the run config asks for it (CPU's faster layout)."""
    if int(context.run_config["channels-last"]):
        return model.to(memory_format=torch.channels_last)
    return model


def received(msg: Message, context: Context) -> nn.Module:
    """The global model the message carries."""
    model = laid_out(build_model("cnn"), context)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def standard(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights in the standard layout, as they travel."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch on this client's partition."""
    torch.set_num_threads(1)
    config = context.run_config
    train_split, _ = local(context, str(config["data-path"]), int(config["seed"]))
    model = received(msg, context)
    loss = train_epochs(
        model, train_split, 1, int(msg.content["config"]["server-round"])
    )
    metrics = {"train_loss": loss, "num-examples": len(train_split)}
    reply = RecordDict(
        {"arrays": ArrayRecord(standard(model)), "metrics": MetricRecord(metrics)}
    )
    return Message(reply, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on the slice this client keeps aside."""
    torch.set_num_threads(1)
    config = context.run_config
    _, held_out = local(context, str(config["data-path"]), int(config["seed"]))
    model = received(msg, context)
    metrics = {**score(model, held_out), "num-examples": len(held_out)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for the configured rounds, the global model scored on val each round."""
    config = context.run_config
    val = load_data(str(config["data-path"])).split("val")
    clients = int(config["num-clients"])
    torch.manual_seed(int(config["seed"]))
    model = laid_out(build_model("cnn"), context)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = score(model, val)
        print(f"peer-round {server_round} {time.time():.6f}", flush=True)
        return MetricRecord(metrics)

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=clients,
        min_evaluate_nodes=clients,
        min_available_nodes=clients,
    )
    strategy.start(
        grid,
        ArrayRecord(standard(model)),
        num_rounds=int(config["num-rounds"]),
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
