"""Split the training data among simulated hospitals with flwr-datasets.

The partitioners run on an in-memory ``datasets.Dataset`` of labels and row
indices (no Hub access, no image copies) and are cached per process: a Ray
actor serves many virtual clients one after another.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client_app.data import DataError, Split, XrayData, load_data
from client_app.files import write_file_atomically
from client_app.messages import TrainInstructions

if TYPE_CHECKING:
    from types import ModuleType

    from flwr_datasets.partitioner.partitioner import Partitioner

# flwr-datasets and datasets are imported where partitions are drawn: a command
# that stops at a bad input (or never partitions, like centralized training)
# should not pay their import.

log = logging.getLogger(__name__)

# Under the outputs folder: draws kept for the clients (see keep_partitions).
PARTITIONS_DIR = "partitions"


@dataclass(frozen=True)
class PartitionSpec:
    """Everything that determines one client's data (hashable, for caching)."""

    data_path: str | None
    limit: int | None
    image_size: int
    seed: int
    name: str
    alpha: float
    classes_per_client: int
    min_partition_size: int
    num_partitions: int
    partition_seed: int
    val_fraction: float

    @classmethod
    def from_instructions(
        cls, ins: TrainInstructions, num_partitions: int, data_path: str
    ) -> PartitionSpec:
        """Build the spec a client derives from the server's round instructions."""
        return cls(
            data_path=data_path or None,
            limit=ins.data_limit or None,
            image_size=ins.image_size,
            seed=ins.seed,
            name=ins.partition_name,
            alpha=ins.partition_alpha,
            classes_per_client=ins.partition_classes,
            min_partition_size=ins.partition_min_size,
            num_partitions=num_partitions,
            partition_seed=ins.partition_seed,
            val_fraction=ins.client_val_fraction,
        )


def partitioners() -> ModuleType:
    """Import ``flwr_datasets.partitioner`` without its package's plotting helpers.

    ``flwr_datasets/__init__`` imports its visualisation and metrics modules
    (seaborn, matplotlib, scipy.stats): 1.1 s at import and 0.2 s at exit in
    every process that partitions (the CLI's check, every client), none of it
    used by the partitioners. While the subpackage loads, the package is an
    unexecuted module; it is then dropped from ``sys.modules``, so a later
    ``import flwr_datasets`` runs the package's ``__init__`` as usual.
    """
    if "flwr_datasets" in sys.modules or "flwr_datasets.partitioner" in sys.modules:
        return importlib.import_module("flwr_datasets.partitioner")
    spec = importlib.util.find_spec("flwr_datasets")
    assert spec is not None, "flwr-datasets is a dependency"
    sys.modules["flwr_datasets"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module("flwr_datasets.partitioner")
    finally:
        del sys.modules["flwr_datasets"]


def make_partitioner(spec: PartitionSpec) -> Partitioner:
    """Build the flwr-datasets partitioner the spec names."""
    found = partitioners()
    if spec.name == "iid":
        return found.IidPartitioner(num_partitions=spec.num_partitions)
    if spec.name == "dirichlet":
        return found.DirichletPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=spec.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=spec.partition_seed,
        )
    if spec.name == "pathological":
        return found.PathologicalPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            # partition_id % 2 gives the first class: no class is left unused.
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=spec.partition_seed,
        )
    raise ValueError(
        f"partition.name {spec.name!r} is not one of iid, dirichlet, pathological"
    )


@lru_cache(maxsize=4)
def load_training_data(
    path: str | None, limit: int | None, image_size: int, seed: int
) -> XrayData:
    """Load (and cache per process) the data every client partitions."""
    return load_data(path, image_size=image_size, limit=limit, seed=seed)


def kept_partitions(spec: PartitionSpec, labels: np.ndarray, folder: Path) -> Path:
    """Where a draw of ``spec`` over these train ``labels`` is kept under ``folder``.

    A draw depends on nothing else (``draw_partitions``), so the name hashes
    exactly that: another setting, or data with other labels, never reads it.
    """
    digest = hashlib.sha256(repr(spec).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return folder / PARTITIONS_DIR / f"{digest.hexdigest()[:24]}.npz"


def keep_partitions(
    spec: PartitionSpec,
    labels: np.ndarray,
    folder: Path,
    partitions: tuple[np.ndarray, ...],
) -> None:
    """Keep a draw for the clients (best effort: they draw it again without it)."""
    target = kept_partitions(spec, labels, folder)
    buffer = io.BytesIO()
    np.savez(buffer, *partitions)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(target, buffer.getvalue())
    except OSError as exc:
        log.warning("cannot keep the partitions under %s (%s)", folder, exc.strerror)


@lru_cache(maxsize=4)
def partition_indices(
    spec: PartitionSpec, folder: Path | None = None
) -> tuple[np.ndarray, ...]:
    """Return the train-split row indices of every partition (cached).

    A draw the launcher kept under ``folder`` (``keep_partitions``) is read
    instead of drawn again: each Ray worker would otherwise import ``datasets``
    (about a second) before its first reply.
    """
    labels = (
        load_training_data(spec.data_path, spec.limit, spec.image_size, spec.seed)
        .split("train")
        .labels
    )
    kept = kept_partitions(spec, labels, folder) if folder is not None else None
    if kept is not None and kept.is_file():
        with np.load(kept) as arrays:
            partitions = tuple(arrays[f"arr_{i}"] for i in range(len(arrays.files)))
        if len(partitions) == spec.num_partitions:
            return partitions
    return draw_partitions(spec, labels)


def draw_partitions(spec: PartitionSpec, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Split the train-split rows with these labels among the spec's clients."""
    if spec.num_partitions * max(spec.min_partition_size, 1) > len(labels):
        raise DataError(
            f"simulation.num_supernodes={spec.num_partitions} needs at least "
            f"{spec.num_partitions * spec.min_partition_size} training images "
            f"(partition.min_partition_size={spec.min_partition_size} each) but "
            f"there are {len(labels)}; use fewer clients or a smaller "
            "partition.min_partition_size"
        )
    from datasets import Dataset, disable_progress_bars

    # The index bookkeeping below takes milliseconds; its progress bars are noise.
    disable_progress_bars()
    dataset = Dataset.from_dict(
        {"label": labels.tolist(), "row": list(range(len(labels)))}
    )
    if spec.name == "iid":  # IidPartitioner splits in order: shuffle first
        dataset = dataset.shuffle(seed=spec.partition_seed).flatten_indices()
    partitioner = make_partitioner(spec)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            # Each failed Dirichlet draw warns; the outcome is reported below.
            warnings.filterwarnings("ignore", module="flwr_datasets")
            return tuple(
                np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                for i in range(spec.num_partitions)
            )
    except ValueError as exc:  # flwr-datasets gives up after 10 Dirichlet draws
        if spec.name != "dirichlet":
            raise
        raise DataError(
            f"partition.alpha={spec.alpha} could not give all "
            f"{spec.num_partitions} clients at least partition.min_partition_size="
            f"{spec.min_partition_size} training images in 10 draws ({exc}); "
            "raise partition.alpha, lower partition.min_partition_size, use "
            "fewer clients or draw again with another partition.seed"
        ) from None


def client_split(
    spec: PartitionSpec, partition_id: int, folder: Path | None = None
) -> tuple[Split, Split]:
    """Return one client's (train, local validation) data.

    ``folder``: where the launcher may have kept the draw (the outputs folder).
    """
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{spec.num_partitions - 1}"
        )
    train = load_training_data(
        spec.data_path, spec.limit, spec.image_size, spec.seed
    ).split("train")
    rows = partition_indices(spec, folder)[partition_id]
    rng = np.random.default_rng([spec.partition_seed, partition_id])
    rows = rng.permutation(rows)
    n_val = int(round(len(rows) * spec.val_fraction)) if len(rows) > 1 else 0
    n_val = max(n_val, 1) if len(rows) > 1 else 0
    return train.subset(rows[n_val:]), train.subset(rows[:n_val])
