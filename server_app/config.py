"""The typed experiment configuration: Hydra structured configs.

The dataclasses below are registered in Hydra's ConfigStore as the schema of
``conf/config.yaml``: Hydra and OmegaConf check types and Enum choices while
composing. Value ranges are declared next to each key (``bounded``) and checked
by one generic walk; only rules that relate several keys are written by hand.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from persistence.errors import InputError
from server_app.choices import (
    Backend,
    ClientWrites,
    Device,
    LrSchedule,
    ModelName,
    Norm,
    Optimizer,
    PartitionName,
    PrivacyMode,
    StrategyName,
)

SCHEMA_NAME = "fedpneumo_schema"


class ConfigError(InputError):
    """A configuration problem, reported in one line naming the key."""


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric key; ``None`` means unbounded."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, value: float) -> bool:
        """Return whether value lies in the range."""
        return not (
            (self.gt is not None and value <= self.gt)
            or (self.ge is not None and value < self.ge)
            or (self.lt is not None and value >= self.lt)
            or (self.le is not None and value > self.le)
        )

    def describe(self) -> str:
        """Return the range as ``> 0``, ``>= 1`` or ``in (0, 1]``."""
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge)
        high = (")", self.lt) if self.lt is not None else ("]", self.le)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}{low[1]:.12g}, {high[1]:.12g}{high[0]}"
        if low[1] is not None:
            return f"{'>' if self.gt is not None else '>='} {low[1]:.12g}"
        return f"{'<' if self.lt is not None else '<='} {high[1]:.12g}"


def bounded(default: Any, **bounds: float) -> Any:
    """Declare a dataclass field with a default and an allowed range."""
    return field(default=default, metadata={"bounds": Bounds(**bounds)})


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    path: str | None = None
    limit: int | None = bounded(None, ge=1)
    image_size: int = bounded(28, ge=8)
    augment: bool = True
    client_val_fraction: float = bounded(0.1, gt=0, lt=1)


@dataclass
class ModelConfig:
    """Which network to train."""

    name: ModelName = ModelName.cnn
    width: int = bounded(32, ge=1)
    dropout: float = bounded(0.2, ge=0, lt=1)
    norm: Norm = Norm.batch


@dataclass
class TrainConfig:
    """Local optimisation settings, shared by clients and centralized training."""

    epochs: int = bounded(10, ge=1)
    local_epochs: int = bounded(1, ge=1)
    batch_size: int = bounded(64, ge=1)
    lr: float = bounded(1e-3, gt=0)
    lr_schedule: LrSchedule = LrSchedule.constant
    optimizer: Optimizer = Optimizer.adam
    weight_decay: float = bounded(0.0, ge=0)
    class_weighting: bool = True
    device: Device = Device.auto


@dataclass
class PartitionConfig:
    """How the training split is divided among simulated hospitals."""

    name: PartitionName = PartitionName.dirichlet
    alpha: float = bounded(0.5, gt=0)
    # There are 2 classes.
    classes_per_client: int = bounded(1, ge=1, le=2)
    min_partition_size: int = bounded(10, ge=1)
    # Seed of the partition draw alone; null = the run's seed.
    seed: int | None = bounded(None, ge=0, le=2**32 - 1)


@dataclass
class StrategyConfig:
    """A Flower strategy and its constructor arguments."""

    name: StrategyName = StrategyName.fedavg
    fraction_train: float = bounded(1.0, gt=0, le=1)
    # A round fails the run when fewer of the sampled clients reply.
    min_success_fraction: float = bounded(0.5, gt=0, le=1)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DbConfig:
    """Tracking database; the URL is db.url, else $DATABASE_URL, else SQLite."""

    url: str | None = None
    sqlite_path: str = "outputs/fedpneumo.db"
    require_backend: Backend | None = None


@dataclass
class SimulationConfig:
    """Size and resources of the simulated federation."""

    num_supernodes: int = bounded(10, ge=1)
    client_num_cpus: int = bounded(1, ge=1)
    client_num_gpus: float = bounded(0.0, ge=0)
    num_cpus: int | None = bounded(None, ge=1)
    # host:port of a running Ray cluster's head (`ray start --head`) to run
    # the clients on; null = Flower starts its own Ray on this machine.
    ray_address: str | None = None


@dataclass
class TrackingConfig:
    """How metrics reach the database."""

    client_writes: ClientWrites = ClientWrites.direct
    enable_db: bool = True
    stale_after_s: float = bounded(900.0, gt=0)
    # How long a run trains on while the database is unreachable (rows wait
    # in the spool); then it stops and its status waits for `fedpneumo sync`.
    outage_timeout_s: float = bounded(300.0, gt=0)


@dataclass
class EvaluationConfig:
    """Federated evaluation: each hospital scores the global model on its slice.

    The slice is the held-out part of the hospital's data (data.client_val_fraction);
    the decision threshold is the one the server chose on val that round.
    """

    # Off: only the server's val evaluation runs.
    federated: bool = True
    # Share of the hospitals asked each evaluated round (at least one).
    fraction: float = bounded(1.0, gt=0, le=1)
    # Evaluate every k-th round (and always the last one).
    every: int = bounded(1, ge=1)


@dataclass
class PrivacySettings:
    """Differential privacy of the model updates: one of Flower's DP wrappers.

    The fixed modes use ``clipping_norm``; the adaptive ones the
    ``initial_clipping_norm`` .. ``clipped_count_stddev`` keys. ``delta``
    null = the largest power of ten below 1 / training images (stored in the
    run's config); ``max_epsilon`` null = no budget.
    """

    mode: PrivacyMode = PrivacyMode.none
    noise_multiplier: float = bounded(1.0, gt=0)
    clipping_norm: float = bounded(1.0, gt=0)
    initial_clipping_norm: float = bounded(0.1, gt=0)
    target_clipped_quantile: float = bounded(0.5, ge=0, le=1)
    clip_norm_lr: float = bounded(0.2, gt=0)
    clipped_count_stddev: float | None = bounded(None, gt=0)
    delta: float | None = bounded(None, gt=0, lt=1)
    max_epsilon: float | None = bounded(None, gt=0)


@dataclass
class AppConfig:
    """The whole, validated experiment configuration."""

    experiment_name: str = "pneumonia"
    # NumPy's generators take seeds below 2**32.
    seed: int = bounded(42, ge=0, le=2**32 - 1)
    num_rounds: int = bounded(5, ge=1)
    outputs_dir: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    db: DbConfig = field(default_factory=DbConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)


def register_schema() -> None:
    """Register ``AppConfig`` as the schema ``conf/config.yaml`` starts from."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=AppConfig)


def _invalid(key: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is invalid; {valid}")


def check_values(node: Any, prefix: str = "") -> None:
    """Check every key's declared range, and that every float is finite."""
    for f in fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if is_dataclass(value):
            check_values(value, key + ".")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise _invalid(key, value, "it must be a finite number")
        bounds: Bounds | None = f.metadata.get("bounds")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if bounds is None or not numeric:
            continue
        if not bounds.holds(value):
            optional = f.default is None
            raise _invalid(
                key,
                value,
                f"use null or {bounds.describe()}"
                if optional
                else f"it must be {bounds.describe()}",
            )


def strategy_class(name: str) -> type:
    """Return Flower's strategy class for a config name."""
    module = importlib.import_module("flwr.serverapp.strategy")
    classes = {n.lower(): getattr(module, n) for n in module.__all__}
    return classes[str(name)]


# Set by the strategy factory itself, or meaningless for ours: not user params.
MANAGED_STRATEGY_ARGS = {
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


@dataclass(frozen=True)
class ParamRule:
    """The allowed values of a Flower strategy argument."""

    bounds: Bounds
    integer: bool = False


# Flower's signatures say only "float" or "int"; out of these ranges its
# strategies diverge, divide by zero or silently do nothing useful, so the
# ranges are checked here, before anything starts. Names mean the same in
# every Flower class that takes them (FedAdam, FedYogi, FedAdagrad share eta).
STRATEGY_PARAM_RULES: dict[str, ParamRule] = {
    # FedProx: mu < 0 would reward clients for drifting from the global model.
    "proximal_mu": ParamRule(Bounds(ge=0)),
    # FedOpt family: server and client learning rates, adaptivity constant.
    "eta": ParamRule(Bounds(gt=0)),
    "eta_l": ParamRule(Bounds(gt=0)),
    "tau": ParamRule(Bounds(gt=0)),
    # Moment decay rates; 1 divides by zero in FedAdam's bias correction.
    "beta_1": ParamRule(Bounds(ge=0, lt=1)),
    "beta_2": ParamRule(Bounds(ge=0, lt=1)),
    # FedAvgM.
    "server_learning_rate": ParamRule(Bounds(gt=0)),
    "server_momentum": ParamRule(Bounds(ge=0, lt=1)),
    # FedTrimmedAvg trims this share from each end, so less than half.
    "beta": ParamRule(Bounds(ge=0, lt=0.5)),
    # Krum, MultiKrum, Bulyan.
    "num_malicious_nodes": ParamRule(Bounds(ge=0), integer=True),
    "num_nodes_to_select": ParamRule(Bounds(ge=1), integer=True),
}


def check_strategy_param(key: str, value: Any) -> None:
    """Check one ``strategy.params`` value against its rule, if it has one."""
    rule = STRATEGY_PARAM_RULES.get(key)
    if rule is None:
        return
    name = f"strategy.params.{key}"
    kind = "an integer" if rule.integer else "a number"
    # bool is an int to Python, but True is no learning rate.
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or (rule.integer and not isinstance(value, int)):
        raise _invalid(name, value, f"it must be {kind} {rule.bounds.describe()}")
    if not math.isfinite(value):
        raise _invalid(name, value, "it must be a finite number")
    if not rule.bounds.holds(value):
        raise _invalid(name, value, f"it must be {rule.bounds.describe()}")


def check_rules(cfg: AppConfig) -> None:
    """Check the rules that relate several keys, or a key to Flower's classes."""
    if not cfg.experiment_name.strip():
        raise _invalid(
            "experiment_name", cfg.experiment_name, "it must be a non-empty name"
        )
    cls = strategy_class(cfg.strategy.name)
    accepted = set(inspect.signature(cls.__init__).parameters) - MANAGED_STRATEGY_ARGS
    for key, value in cfg.strategy.params.items():
        if key not in accepted:
            raise _invalid(
                f"strategy.params.{key}",
                value,
                f"{cls.__name__} accepts: " + ", ".join(sorted(accepted)),
            )
        check_strategy_param(key, value)


def check_qfedavg(cfg: AppConfig) -> None:
    """Check that QFedAvg gets a model it can update (float arrays only)."""
    if cfg.strategy.name == StrategyName.qfedavg and cfg.model.norm == Norm.batch:
        raise ConfigError(
            "strategy=qfedavg with model.norm=batch: Flower's QFedAvg updates every "
            "array in place as floats, and BatchNorm's step counter is an integer; "
            "use model.norm=group (qfedavg's default) or none"
        )


def check_bulyan(cfg: AppConfig) -> None:
    """Check that Bulyan gets the 4 x num_malicious_nodes + 3 replies it needs.

    With fewer, Flower's Bulyan returns no model and the round would be
    skipped silently.
    """
    if cfg.strategy.name != StrategyName.bulyan:
        return
    sampled = sampled_clients(cfg)
    need = 4 * int(cfg.strategy.params.get("num_malicious_nodes", 0)) + 3
    if sampled < need:
        raise ConfigError(
            f"strategy=bulyan needs at least {need} sampled clients "
            f"(4 x num_malicious_nodes + 3) but {sampled} are sampled per round; "
            "raise simulation.num_supernodes or strategy.fraction_train"
        )


RAY_ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


def ray_address(cfg: AppConfig) -> tuple[str, int] | None:
    """Return (host, port) of simulation.ray_address, or None for Flower's own Ray."""
    address = cfg.simulation.ray_address
    if address is None:
        return None
    match = RAY_ADDRESS.match(address)
    if not match or not 0 < int(match["port"]) < 65536:
        raise _invalid(
            "simulation.ray_address",
            address,
            "give the Ray head's host:port (the --port of `ray start --head`), "
            "or null for Flower's own local Ray",
        )
    if cfg.simulation.num_cpus is not None:
        raise ConfigError(
            f"simulation.num_cpus={cfg.simulation.num_cpus} sizes Flower's own Ray, "
            f"but simulation.ray_address={address} uses a running cluster, whose "
            "size is its nodes'; set simulation.num_cpus=null"
        )
    return match["host"], int(match["port"])


def sampled_clients(cfg: AppConfig, num_nodes: int | None = None) -> int:
    """Return how many clients train each round (strategy.fraction_train).

    Of ``num_nodes`` connected ones, by default the configured federation.
    """
    nodes = cfg.simulation.num_supernodes if num_nodes is None else num_nodes
    return max(1, math.ceil(cfg.strategy.fraction_train * nodes))


def check_privacy(cfg: AppConfig) -> None:
    """Check the privacy settings against what Flower's DP wrappers accept."""
    p = cfg.privacy
    if p.mode == PrivacyMode.none:
        if p.max_epsilon is not None:
            raise ConfigError(
                f"privacy.max_epsilon={p.max_epsilon:g} needs a privacy mode; add "
                "privacy=server_fixed (or client_fixed, server_adaptive, "
                "client_adaptive)"
            )
        return
    if cfg.model.norm == Norm.batch:
        raise ConfigError(
            f"privacy={p.mode} with model.norm=batch: BatchNorm's running "
            "statistics are averaged like weights, and DP noise on them breaks the "
            "model; use model.norm=group (the privacy modes' default) or none"
        )
    from flwr.serverapp.strategy import FedAvg

    cls = strategy_class(cfg.strategy.name)
    # Flower's accountant takes the DP noise to cover a plain (uniform) mean
    # of the clipped updates: FedAvg's own aggregation, nothing robust.
    if cls.aggregate_train is not FedAvg.aggregate_train:
        raise ConfigError(
            f"privacy={p.mode} cannot wrap strategy={cfg.strategy.name}: Flower's "
            "privacy accounting needs FedAvg's plain averaging of the clipped "
            f"updates, and {cls.__name__} aggregates otherwise; use "
            "strategy=fedavg or strategy=fedprox, or privacy=none"
        )
    if p.mode in (PrivacyMode.server_adaptive, PrivacyMode.client_adaptive):
        from flwr.supercore.differential_privacy import compute_adaptive_noise_params

        sampled = sampled_clients(cfg)
        try:
            compute_adaptive_noise_params(
                p.noise_multiplier, sampled, p.clipped_count_stddev
            )
        except ValueError:
            stddev = p.clipped_count_stddev or sampled / 20
            raise ConfigError(
                f"privacy.noise_multiplier={p.noise_multiplier:g} with "
                f"privacy.clipped_count_stddev={stddev:g} (null = {sampled} sampled "
                "clients / 20): adaptive clipping needs clipped_count_stddev above "
                f"noise_multiplier / 2 = {p.noise_multiplier / 2:g}; raise "
                "privacy.clipped_count_stddev or lower privacy.noise_multiplier"
            ) from None


def validate(cfg: AppConfig) -> None:
    """Check value ranges and the cross-key rules that types cannot express."""
    check_values(cfg)
    check_rules(cfg)
    check_bulyan(cfg)
    check_qfedavg(cfg)
    ray_address(cfg)
    check_privacy(cfg)


def partition_seed(cfg: AppConfig) -> int:
    """Return the seed of the partition draw: partition.seed, else the run's seed."""
    return cfg.seed if cfg.partition.seed is None else cfg.partition.seed


def partition_label(cfg: AppConfig) -> str:
    """Return the partition as the runs table shows it, e.g. dirichlet(alpha=0.5)."""
    p = cfg.partition
    if p.name == PartitionName.dirichlet:
        return f"dirichlet(alpha={p.alpha:g})"
    if p.name == PartitionName.pathological:
        return f"pathological(classes={p.classes_per_client})"
    return "iid"
