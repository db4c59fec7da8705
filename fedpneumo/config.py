"""Compose the Hydra configuration once into typed, validated dataclasses."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_NAME = "config"

# Flower's own strategy classes (flwr.serverapp.strategy), by config name.
STRATEGY_CLASSES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedavgm": "FedAvgM",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
    "bulyan": "Bulyan",
}
PARTITIONS = ("iid", "dirichlet", "pathological")
MODELS = ("cnn", "resnet18")
NORMS = ("batch", "group", "none")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
CLIENT_WRITES = ("direct", "relay")
# Set by the strategy itself, or meaningless for ours: not user params.
_MANAGED_STRATEGY_ARGS = {
    "self",
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
}


class ConfigError(ValueError):
    """A configuration problem, reported in one line naming the key."""


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    path: str | None = None
    limit: int | None = None
    image_size: int = 28
    augment: bool = True
    client_val_fraction: float = 0.1


@dataclass
class ModelConfig:
    """Which network to train."""

    name: str = "cnn"
    width: int = 32
    dropout: float = 0.2
    norm: str = "batch"


@dataclass
class TrainConfig:
    """Local optimisation settings, shared by clients and centralized training."""

    epochs: int = 10
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    class_weighting: bool = True
    device: str = "auto"


@dataclass
class PartitionConfig:
    """How the training split is divided among simulated hospitals."""

    name: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 1
    min_partition_size: int = 10
    # Seed of the partition draw alone; null = the run's seed.
    seed: int | None = None


@dataclass
class StrategyConfig:
    """A Flower strategy and its constructor arguments."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    # A round fails the run when fewer of the sampled clients reply.
    min_success_fraction: float = 0.5
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DbConfig:
    """Tracking database; the URL is db.url, else $DATABASE_URL, else SQLite."""

    url: str | None = None
    sqlite_path: str = "outputs/fedpneumo.db"
    require_backend: str | None = None


@dataclass
class SimulationConfig:
    """Size and resources of the simulated federation."""

    num_supernodes: int = 10
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0
    num_cpus: int | None = None


@dataclass
class TrackingConfig:
    """How metrics reach the database."""

    client_writes: str = "direct"
    enable_db: bool = True
    stale_after_s: float = 900.0


@dataclass
class AppConfig:
    """The whole, validated experiment configuration."""

    experiment_name: str = "pneumonia"
    seed: int = 42
    num_rounds: int = 5
    outputs_dir: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    db: DbConfig = field(default_factory=DbConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def split_overrides(overrides: str | Sequence[str]) -> list[str]:
    """Split a run-config overrides string (shell quoting rules) into a list."""
    if isinstance(overrides, str):
        try:
            return shlex.split(overrides)
        except ValueError as exc:
            raise ConfigError(f"cannot parse overrides {overrides!r}: {exc}") from None
    return list(overrides)


def group_options(group: str) -> list[str]:
    """Return the option names of a config group (its YAML files)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _keys_at(path: str) -> list[str]:
    node: Any = AppConfig()
    for part in [p for p in path.split(".") if p]:
        node = getattr(node, part, None)
    if node is None or not hasattr(node, "__dataclass_fields__"):
        return []
    return list(node.__dataclass_fields__)


def _explain_hydra_error(exc: Exception) -> ConfigError:
    text = str(exc)
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        return ConfigError(
            f"{group}={option!r} is not a valid option; choose one of: "
            + ", ".join(group_options(group))
        )
    unknown = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        parent = key.rpartition(".")[0]
        valid = _keys_at(parent)
        hint = f"; valid keys{' under ' + parent if parent else ''}: " + ", ".join(
            valid
        )
        return ConfigError(f"unknown config key {key!r}" + (hint if valid else ""))
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ConfigError(first)


def _explain_omegaconf_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    text = str(exc).strip().splitlines()[0]
    if "not in" in text and "Key" in text:
        parent = key.rpartition(".")[0]
        return ConfigError(
            f"unknown config key {key!r}; valid keys"
            f"{' under ' + parent if parent else ''}: " + ", ".join(_keys_at(parent))
        )
    return ConfigError(f"{key}: {text}" if key else text)


def compose_config(overrides: str | Sequence[str] = ()) -> Any:
    """Compose ``conf/config.yaml`` with overrides into a DictConfig."""
    items = split_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name=CONFIG_NAME, overrides=items)
    except (
        MissingConfigException,
        ConfigCompositionException,
        OverrideParseException,
    ) as exc:
        raise _explain_hydra_error(exc) from None
    except OmegaConfBaseException as exc:
        raise _explain_omegaconf_error(exc) from None


def load_config(overrides: str | Sequence[str] = ()) -> AppConfig:
    """Compose, type-check and validate the configuration.

    Raises:
        ConfigError: an unknown key, a bad group option or a bad value, in one
            line naming the key and what is valid.
    """
    app = _typed(compose_config(overrides))
    validate(app)
    return app


def _typed(values: Any) -> AppConfig:
    """Merge values into the typed schema (type errors name the key)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AppConfig), values)
        app = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain_omegaconf_error(exc) from None
    assert isinstance(app, AppConfig)
    return app


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; {valid}")


def _choice(key: str, value: Any, choices: Sequence[str | None]) -> None:
    _check(
        value in choices,
        key,
        value,
        "choose one of: " + ", ".join("null" if c is None else str(c) for c in choices),
    )


def _finite_floats(node: Any, prefix: str = "") -> None:
    for name, value in vars(node).items():
        key = f"{prefix}{name}"
        if hasattr(value, "__dataclass_fields__"):
            _finite_floats(value, key + ".")
        elif isinstance(value, float):
            _check(math.isfinite(value), key, value, "it must be a finite number")


def validate(cfg: AppConfig) -> None:
    """Check value ranges and choices that types alone cannot express."""
    _finite_floats(cfg)
    _check(
        bool(cfg.experiment_name.strip()),
        "experiment_name",
        cfg.experiment_name,
        "it must be a non-empty name",
    )
    _check(cfg.seed >= 0, "seed", cfg.seed, "it must be >= 0")
    _check(cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds, "it must be >= 1")
    d = cfg.data
    _check(d.limit is None or d.limit >= 1, "data.limit", d.limit, "use null or >= 1")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "it must be >= 8")
    _check(
        0 < d.client_val_fraction < 1,
        "data.client_val_fraction",
        d.client_val_fraction,
        "it must be in (0, 1)",
    )
    _choice("model.name", cfg.model.name, MODELS)
    _choice("model.norm", cfg.model.norm, NORMS)
    _check(cfg.model.width >= 1, "model.width", cfg.model.width, "it must be >= 1")
    _check(
        0 <= cfg.model.dropout < 1,
        "model.dropout",
        cfg.model.dropout,
        "it must be in [0, 1)",
    )
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", t.epochs, "it must be >= 1")
    _check(t.local_epochs >= 1, "train.local_epochs", t.local_epochs, "it must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "it must be >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "it must be > 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "it must be >= 0")
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice("train.device", t.device, DEVICES)
    p = cfg.partition
    _choice("partition.name", p.name, PARTITIONS)
    _check(p.alpha > 0, "partition.alpha", p.alpha, "it must be > 0")
    _check(p.seed is None or p.seed >= 0, "partition.seed", p.seed, "use null or >= 0")
    _check(
        p.classes_per_client in (1, 2),
        "partition.classes_per_client",
        p.classes_per_client,
        "there are 2 classes: use 1 or 2",
    )
    _check(
        p.min_partition_size >= 1,
        "partition.min_partition_size",
        p.min_partition_size,
        "it must be >= 1",
    )
    s = cfg.simulation
    _check(
        s.num_supernodes >= 1,
        "simulation.num_supernodes",
        s.num_supernodes,
        "it must be >= 1",
    )
    _check(
        s.client_num_cpus >= 1,
        "simulation.client_num_cpus",
        s.client_num_cpus,
        "it must be >= 1",
    )
    _check(
        s.client_num_gpus >= 0,
        "simulation.client_num_gpus",
        s.client_num_gpus,
        "it must be >= 0",
    )
    _check(
        s.num_cpus is None or s.num_cpus >= 1,
        "simulation.num_cpus",
        s.num_cpus,
        "use null or >= 1",
    )
    _choice("tracking.client_writes", cfg.tracking.client_writes, CLIENT_WRITES)
    _check(
        0 < cfg.strategy.fraction_train <= 1,
        "strategy.fraction_train",
        cfg.strategy.fraction_train,
        "it must be in (0, 1]",
    )
    _check(
        0 < cfg.strategy.min_success_fraction <= 1,
        "strategy.min_success_fraction",
        cfg.strategy.min_success_fraction,
        "it must be in (0, 1]",
    )
    _choice("strategy.name", cfg.strategy.name, list(STRATEGY_CLASSES))
    _validate_strategy_params(cfg.strategy)
    _choice(
        "db.require_backend", cfg.db.require_backend, [None, "sqlite", "postgresql"]
    )


def strategy_class(name: str) -> type:
    """Return Flower's strategy class for a config name."""
    module = importlib.import_module("flwr.serverapp.strategy")
    return getattr(module, STRATEGY_CLASSES[name])


def _validate_strategy_params(strategy: StrategyConfig) -> None:
    cls = strategy_class(strategy.name)
    accepted = set(inspect.signature(cls.__init__).parameters) - _MANAGED_STRATEGY_ARGS
    for key in strategy.params:
        _check(
            key in accepted,
            f"strategy.params.{key}",
            strategy.params[key],
            f"{cls.__name__} accepts: " + ", ".join(sorted(accepted)),
        )


def partition_seed(cfg: AppConfig) -> int:
    """Return the seed of the partition draw: partition.seed, else the run's seed."""
    return cfg.seed if cfg.partition.seed is None else cfg.partition.seed


def resolve_paths(cfg: AppConfig, base: Path | None = None) -> AppConfig:
    """Return the config with outputs_dir, data.path and sqlite_path made absolute."""
    base = base or Path.cwd()

    def absolute(path: str) -> str:
        return str((base / Path(path).expanduser()).resolve())

    data_path = cfg.data.path
    if data_path and data_path != "synthetic":
        data_path = absolute(data_path)
    return replace(
        cfg,
        outputs_dir=absolute(cfg.outputs_dir),
        data=replace(cfg.data, path=data_path),
        db=replace(cfg.db, sqlite_path=absolute(cfg.db.sqlite_path)),
    )


def database_url(cfg: AppConfig) -> str:
    """Return the tracking database URL: db.url, else $DATABASE_URL, else SQLite."""
    url = (
        cfg.db.url
        or os.environ.get("DATABASE_URL")
        or f"sqlite:///{cfg.db.sqlite_path}"
    )
    if cfg.db.require_backend == "postgresql" and not url.startswith("postgresql"):
        raise ConfigError(
            "db=postgres needs a PostgreSQL URL: set DATABASE_URL (or db.url) to "
            "postgresql://user:password@host:5432/database"
        )
    return url


def config_from_snapshot(data: dict[str, Any], current: AppConfig) -> AppConfig:
    """Rebuild a run's config from its stored snapshot (for resume).

    The database section comes from ``current``: the snapshot's URL is masked.
    """
    known = {k: v for k, v in data.items() if k in AppConfig.__dataclass_fields__}
    cfg = _typed(known)
    cfg.db = current.db
    validate(cfg)
    return cfg


def snapshot(cfg: AppConfig, **extra: Any) -> dict[str, Any]:
    """Return the config as a JSON-able dict with secrets removed."""
    data = asdict(cfg)
    if data["db"]["url"]:
        from persistence.db import mask_url

        data["db"]["url"] = mask_url(data["db"]["url"])
    data.update(extra)
    return data
