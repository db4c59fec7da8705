"""The choices of the typed config: one Enum per key with a fixed set of values.

OmegaConf checks a value against its Enum while composing, so an unknown
choice is reported with the valid ones before anything starts.
"""

from __future__ import annotations

from enum import StrEnum


class StrategyName(StrEnum):
    """Flower strategies, by config name: the class name in lower case."""

    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"
    fedadagrad = "fedadagrad"
    fedavgm = "fedavgm"
    fedmedian = "fedmedian"
    fedtrimmedavg = "fedtrimmedavg"
    krum = "krum"
    multikrum = "multikrum"
    bulyan = "bulyan"
    qfedavg = "qfedavg"


class PrivacyMode(StrEnum):
    """Differential privacy: none, or one of Flower's four DP strategy wrappers."""

    none = "none"
    server_fixed = "server_fixed"
    server_adaptive = "server_adaptive"
    client_fixed = "client_fixed"
    client_adaptive = "client_adaptive"


class PartitionName(StrEnum):
    """How the training split is divided among hospitals."""

    iid = "iid"
    dirichlet = "dirichlet"
    pathological = "pathological"


class ModelName(StrEnum):
    """Networks the trainer can build."""

    cnn = "cnn"
    resnet18 = "resnet18"


class Norm(StrEnum):
    """Normalisation layers of the networks."""

    batch = "batch"
    group = "group"
    none = "none"


class Optimizer(StrEnum):
    """Local optimisers."""

    adam = "adam"
    sgd = "sgd"


class LrSchedule(StrEnum):
    """Learning-rate schedules (per epoch, or per round in federated runs)."""

    constant = "constant"
    cosine = "cosine"


class Device(StrEnum):
    """Where tensors live; auto picks CUDA when present."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ClientWrites(StrEnum):
    """How clients' metric rows reach the database."""

    direct = "direct"
    relay = "relay"


class Backend(StrEnum):
    """Database backends a config may require."""

    sqlite = "sqlite"
    postgresql = "postgresql"
