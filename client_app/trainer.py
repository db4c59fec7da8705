"""The plain PyTorch training loop, shared by clients and centralized training.

No Flower imports: this module is the ``task.py`` of the app.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
import random
import time
import weakref
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client_app import model as models
from client_app.data import Split
from client_app.files import write_file_atomically
from client_app.loaders import DeviceSplit, EpochOrder
from client_app.metrics import binary_metrics, youden_threshold
from persistence.errors import FailedRunError, InputError

log = logging.getLogger(__name__)


class TrainingDivergedError(FailedRunError):
    """The training loss became NaN or infinite."""


class CheckpointError(InputError):
    """A checkpoint file that is missing, unreadable or not a fedpneumo one."""


CHECKPOINT_HINT = "pass --checkpoint a best_model.pt saved by fedpneumo train or run"
# What every fedpneumo checkpoint holds, besides meta such as image_size.
CHECKPOINT_KEYS = ("state_dict", "threshold", "model")
# Models whose weights cpu_layout holds channels-last right now.
_CHANNELS_LAST: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Callback:
    """Hooks the trainer calls; override the ones you need."""

    def on_train_start(self) -> None:
        """Call before the first epoch."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Receive one epoch's metrics (keys like ``train_loss``, ``val_auroc``)."""

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        """Receive the final summary after the last epoch."""

    def on_train_error(self, exc: BaseException) -> None:
        """Learn that training raised (the exception is re-raised afterwards)."""


@dataclass
class TrainSettings:
    """Everything the loop needs besides the model and data."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    # Per-epoch learning-rate schedule (see lr_at); clients get theirs per round.
    lr_schedule: str = "constant"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    # Weight of the positive class in the loss; None = no weighting.
    pos_weight: float | None = None
    # FedProx: mu/2 * ||w - w_global||^2 added to the loss (0 = off).
    proximal_mu: float = 0.0
    augment: bool = False
    device: str = "auto"
    seed: int = 0
    # Centralized: keep the epoch with the best val AUROC and save it here.
    select_best: bool = False
    checkpoint_path: Path | None = None
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    """What a call to ``fit`` produced."""

    history: list[dict[str, float]]
    num_examples: int
    best_epoch: int | None = None
    threshold: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def lr_at(base_lr: float, schedule: str, step: int, total: int) -> float:
    """Learning rate at step (1-based) of total: constant, or cosine to 5%.

    Used per epoch in centralized training and per round in federated
    training, where the server sends each round's rate to the clients.
    """
    if schedule == "constant" or total <= 1:
        return base_lr
    progress = (step - 1) / (total - 1)
    floor = 0.05 * base_lr
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def select_device(name: str = "auto") -> torch.device:
    """Return CUDA when asked for (or auto and available), else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def balanced_pos_weight(labels: np.ndarray) -> float | None:
    """Return n_negative / n_positive, or None when a class is absent."""
    positives = int(labels.sum())
    return pos_weight_from_counts(len(labels) - positives, positives)


def pos_weight_from_counts(negatives: int, positives: int) -> float | None:
    """Return negatives / positives, or None when a class is absent."""
    if positives <= 0 or negatives <= 0:
        return None
    return negatives / positives


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


@contextmanager
def cpu_layout(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Hold the model's conv weights channels-last on CPU while it computes.

    oneDNN's convolutions run faster on channels-last weights (the small CNN
    trains in about 0.8x the time). The weights go back to the standard
    layout on exit, so state dicts, checkpoints and Flower's arrays see the
    tensors they always did. On CUDA the model is left as it is.
    """
    # Nested uses (fit scoring its held-out slice) keep the outer layout.
    if device.type != "cpu" or model in _CHANNELS_LAST:
        yield
        return
    model.to(memory_format=torch.channels_last)
    _CHANNELS_LAST.add(model)
    try:
        yield
    finally:
        _CHANNELS_LAST.discard(model)
        model.to(memory_format=torch.contiguous_format)


def on_device(split: Split | DeviceSplit, device: torch.device) -> DeviceSplit:
    """Return the split held on ``device`` (as is when it already is)."""
    if isinstance(split, DeviceSplit) and split.device == device:
        return split
    if isinstance(split, DeviceSplit):
        raise ValueError(f"split is on {split.device}, the model on {device}")
    return DeviceSplit(split, device)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    split: Split | DeviceSplit,
    batch_size: int = 256,
    device: str = "auto",
) -> tuple[np.ndarray, float]:
    """Return P(pneumonia) for every image of a split and the mean BCE loss.

    Everything stays on the device until the one copy of the results.
    """
    dev = select_device(device)
    model.to(dev).eval()
    data = on_device(split, dev)
    with cpu_layout(model, dev):
        logits = torch.cat([model(images) for images, _ in data.batches(batch_size)])
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, data.labels, reduction="sum"
    )
    probs = torch.sigmoid(logits).cpu().numpy()
    return probs, loss.item() / max(len(data), 1)


def evaluate(
    model: nn.Module,
    split: Split | DeviceSplit,
    *,
    threshold: float | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, float]:
    """Score a model on a split; without a threshold, pick Youden's on this split."""
    probs, loss = predict_proba(model, split, batch_size, device)
    labels = split.host_labels if isinstance(split, DeviceSplit) else split.labels
    if threshold is None:
        threshold = youden_threshold(labels, probs)
    metrics = binary_metrics(labels, probs, threshold=threshold, loss=loss)
    metrics["threshold"] = float(threshold)
    return metrics


def _prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}


def _train_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    global_params: list[torch.Tensor] | None,
    s: TrainSettings,
    dev: torch.device,
    epoch: int,
) -> dict[str, float]:
    model.train()
    # Sums stay on the device: reading a value per batch would make the host
    # wait for the device every batch. The epoch synchronises once, at the end.
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = loss_fn(logits, labels)
        if global_params is not None and s.proximal_mu > 0:
            prox = sum(
                (w - g).pow(2).sum()
                for w, g in zip(model.parameters(), global_params, strict=True)
            )
            loss = loss + 0.5 * s.proximal_mu * prox
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(labels)
        correct += ((logits.detach() > 0).float() == labels).sum()
        total += len(labels)
    mean_loss = loss_sum.item() / max(total, 1)
    # A non-finite batch loss makes the epoch's sum non-finite: checked once.
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(
            f"training diverged at epoch {epoch}: train loss is {mean_loss} "
            f"with train.lr={s.lr:g}; try a lower train.lr"
        )
    return {"loss": mean_loss, "accuracy": correct.item() / max(total, 1)}


def fit(
    model: nn.Module,
    train: Split,
    val: Split | None,
    settings: TrainSettings,
    *,
    test: Split | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train a model, reporting each epoch to the callbacks.

    This is the local training loop, kept in one function on purpose (it is
    the one place that reads top to bottom as an epoch does).

    With ``select_best`` the weights of the epoch with the best val AUROC are
    restored, its val threshold (Youden's J) is kept, and the model is saved to
    ``checkpoint_path``; the summary then holds final val (and test) metrics.
    """
    s = settings
    dev = select_device(s.device)
    seed_everything(s.seed)
    model.to(dev)
    data = DeviceSplit(train, dev)
    # The same shuffles as a DataLoader seeded with s.seed (see loaders.py).
    order = EpochOrder(len(data), s.seed)
    held_out = DeviceSplit(val, dev) if val is not None and len(val) else None
    optimizer = _optimizer(model, s)
    pos_weight = (
        None if s.pos_weight is None else torch.tensor(s.pos_weight, device=dev)
    )
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    global_params = (
        [p.detach().clone() for p in model.parameters()] if s.proximal_mu > 0 else None
    )
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    with cpu_layout(model, dev):
        try:
            for cb in callbacks:
                cb.on_train_start()
            for epoch in range(1, s.epochs + 1):
                started = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(s.lr, s.lr_schedule, epoch, s.epochs)
                batches = data.batches(s.batch_size, order.next_epoch(), s.augment)
                metrics = _prefixed(
                    "train",
                    _train_epoch(
                        model, batches, optimizer, loss_fn, global_params, s, dev, epoch
                    ),
                )
                if held_out is not None:
                    val_metrics = evaluate(model, held_out, device=s.device)
                    metrics.update(_prefixed("val", val_metrics))
                    auroc = val_metrics["auroc"]
                    score = -math.inf if math.isnan(auroc) else auroc
                    if s.select_best and (best is None or score > best[0]):
                        best = (score, epoch, copy.deepcopy(model.state_dict()))
                metrics["epoch_seconds"] = time.perf_counter() - started
                history.append(metrics)
                for cb in callbacks:
                    cb.on_epoch_end(epoch, metrics)
            result = FitResult(history=history, num_examples=len(train))
            if s.select_best and best is not None and val is not None:
                result = _finish_best(model, best, val, test, s, result)
            for cb in callbacks:
                cb.on_train_end(result.summary)
            return result
        except BaseException as exc:
            for cb in callbacks:
                cb.on_train_error(exc)
            raise


def _finish_best(
    model: nn.Module,
    best: tuple[float, int, dict[str, Any]],
    val: Split,
    test: Split | None,
    s: TrainSettings,
    result: FitResult,
) -> FitResult:
    _, epoch, state = best
    model.load_state_dict(state)
    val_metrics = evaluate(model, val, device=s.device)
    threshold = val_metrics["threshold"]
    summary: dict[str, Any] = {"best_epoch": epoch, "threshold": threshold}
    summary.update(_prefixed("final_val", val_metrics))
    if test is not None and len(test):
        test_metrics = evaluate(model, test, threshold=threshold, device=s.device)
        summary.update(_prefixed("final_test", test_metrics))
    if s.checkpoint_path is not None:
        save_checkpoint(
            s.checkpoint_path,
            model,
            threshold=threshold,
            meta={**s.checkpoint_meta, "epoch": epoch},
        )
        summary["checkpoint_path"] = str(s.checkpoint_path)
    result.best_epoch, result.threshold, result.summary = epoch, threshold, summary
    return result


def serialized(obj: Any) -> bytes:
    """Return ``torch.save``'s bytes for obj.

    Serialising in memory first makes a full disk fail as the plain
    ``OSError: No space left on device`` of the file write, not as torch's
    opaque RuntimeError from inside its zip writer.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(
    path: Path, model: nn.Module, *, threshold: float, meta: Mapping[str, Any]
) -> Path:
    """Save weights, decision threshold and model settings atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous(): weights saved in the standard layout whatever the caller held.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_file_atomically(
        path, serialized({"state_dict": state, "threshold": threshold, **meta})
    )
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; raise CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint '{path}' is a folder, not a file; {CHECKPOINT_HINT}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; {CHECKPOINT_HINT}")
    # torch.save writes a zip archive; anything else (a truncated copy, a
    # stray file) would reach the unpickler and fail with a misleading message.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint '{path}' is not a PyTorch checkpoint (not a zip archive: "
            f"truncated, or another kind of file); {CHECKPOINT_HINT}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint '{path}' holds Python objects other than tensors and plain "
            f"values, which are not loaded for safety; {CHECKPOINT_HINT}"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as err:
        # torch's own text is several lines of internals; the cause is chained.
        raise CheckpointError(
            f"checkpoint '{path}' is a zip archive that torch.load cannot read "
            f"(corrupted, or not written by torch.save); {CHECKPOINT_HINT}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(state).__name__}, not fedpneumo's "
            f"dict of state_dict, threshold and model; {CHECKPOINT_HINT}"
        )
    return state


def restore_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint declares, with its weights; return both.

    Raises:
        CheckpointError: the file is missing or unreadable, lacks fedpneumo's
            keys, or holds weights that do not fit the model it declares.
    """
    state = load_checkpoint(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' is not a fedpneumo checkpoint (no "
            f"{', '.join(missing)}); {CHECKPOINT_HINT}"
        )
    meta, weights, threshold = state["model"], state["state_dict"], state["threshold"]
    if not isinstance(meta, dict) or not isinstance(weights, dict):
        raise CheckpointError(
            f"checkpoint '{path}' is not a fedpneumo checkpoint (its model or "
            f"state_dict entry is not a dict); {CHECKPOINT_HINT}"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise CheckpointError(
            f"checkpoint '{path}' has threshold {threshold!r} instead of a number; "
            f"{CHECKPOINT_HINT}"
        )
    image_size = state.get("image_size", 28)
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 8
    ):
        raise CheckpointError(
            f"checkpoint '{path}' has image_size {image_size!r}; expected an integer "
            f">= 8 (the data.image_size it was trained at); {CHECKPOINT_HINT}"
        )
    try:
        model = models.build_model(**meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint '{path}' declares a model that cannot be built ({err}); "
            f"{CHECKPOINT_HINT}"
        ) from err
    problem = _weights_problem(model, weights, meta)
    if problem:
        raise CheckpointError(
            f"checkpoint '{path}' declares {_describe_spec(meta)} but holds "
            f"{problem}; expected that model's weights, as fedpneumo train or run "
            "saves them"
        )
    model.load_state_dict(weights)
    return model, state


def _describe_spec(meta: Mapping[str, Any]) -> str:
    return " ".join(f"model.{key}={value}" for key, value in meta.items())


def _weights_problem(
    model: nn.Module, weights: Mapping[str, Any], meta: Mapping[str, Any]
) -> str | None:
    """Say how ``weights`` do not fit ``model``, or return None when they do."""
    expected = model.state_dict()
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unexpected or missing:
        other = _model_of_keys(set(weights), meta)
        if other is not None:
            return f"{other} weights"
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unknown keys such as '{unexpected[0]}'")
        if missing:
            more = (
                f" and {len(missing) - 1} more of its keys" if len(missing) > 1 else ""
            )
            parts.append(f"no '{missing[0]}'{more}")
        return "weights of another model (" + ", ".join(parts) + ")"
    for key, tensor in expected.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor):
            return f"a {type(value).__name__} for '{key}' instead of a tensor"
        if value.shape != tensor.shape:
            return (
                f"weights of another size ('{key}' has shape {list(value.shape)}, "
                f"the model's is {list(tensor.shape)})"
            )
    return None


def _model_of_keys(keys: set[str], meta: Mapping[str, Any]) -> str | None:
    """Return the name of another model whose parameter names are ``keys``."""
    norm = meta.get("norm", "batch")
    for name in models.MODEL_NAMES:
        if name == meta.get("name"):
            continue
        try:
            candidate = models.build_model(name, norm=norm)
        except ValueError:
            return None
        if set(candidate.state_dict()) == keys:
            return name
    return None
