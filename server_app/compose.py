"""Compose ``conf/`` with overrides into the typed ``AppConfig``, once.

Overrides are checked against the schema before Hydra sees them, so an unknown
key or group option is reported in our words (naming the valid ones), and type
errors come from OmegaConf's structured-config checks with the key they hit.
Hydra is imported only where a config is composed: the ServerApp of
`fedpneumo run` receives the composed config (``config_message``) instead.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from persistence.db import mask_url, resolve_database_url
from server_app.config import (
    AppConfig,
    Backend,
    ConfigError,
    register_schema,
    validate,
)

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_NAME = "config"


URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def mask_override(text: str) -> str:
    """Hide the password of any URL in an override (``db.url=...``) for messages."""
    return URL_PASSWORD.sub(r"\1***@", text)


def split_overrides(overrides: str | Sequence[str]) -> list[str]:
    """Split a run-config overrides string (shell quoting rules) into a list."""
    if isinstance(overrides, str):
        try:
            return shlex.split(overrides)
        except ValueError as exc:
            shown = mask_override(overrides)
            raise ConfigError(f"cannot parse overrides {shown!r}: {exc}") from None
    return list(overrides)


def group_options(group: str) -> list[str]:
    """Return the option names of a config group (its YAML files)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _node_at(path: str) -> Any:
    """Return the schema node at a dotted path (a dataclass, a dict or a value)."""
    node: Any = AppConfig()
    for part in [p for p in path.split(".") if p]:
        if isinstance(node, dict):
            return {}
        node = getattr(node, part, None) if is_dataclass(node) else None
    return node


def _check_key(key: str) -> None:
    """Raise for a key the schema does not have (free-form dicts accept any)."""
    parent, _, name = key.rpartition(".")
    node = _node_at(parent)
    if isinstance(node, dict):
        return
    valid = [f.name for f in fields(node)] if is_dataclass(node) else []
    if name not in valid:
        where = f" under {parent}" if parent else ""
        hint = f"; valid keys{where}: " + ", ".join(valid) if valid else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")


def parse_overrides(items: Sequence[str]) -> list[Override]:
    """Parse Hydra overrides; a syntax error is one line naming them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(items))
    except OverrideParseException as exc:
        first = mask_override(str(exc).strip().splitlines()[0])
        shown = [mask_override(item) for item in items]
        raise ConfigError(f"cannot parse overrides {shown}: {first}") from None


def check_overrides(items: Sequence[str]) -> None:
    """Check override keys and group options before Hydra composes them."""
    for override in parse_overrides(items):
        key = override.key_or_group
        if override.is_delete():
            continue
        if override.is_sweep_override():
            raise ConfigError(
                f"{override.input_line} is a sweep: run it with --multirun (-m)"
            )
        if (CONF_DIR / key).is_dir():
            value = override.value()
            options = group_options(key)
            if value not in options:
                raise ConfigError(
                    f"{key}={value!r} is not a valid option; choose one of: "
                    + ", ".join(options)
                )
            continue
        _check_key(key)


def explain(exc: OmegaConfBaseException) -> ConfigError:
    """Turn an OmegaConf error into one line naming the key and what is valid."""
    key = str(getattr(exc, "full_key", "") or "")
    node = _node_at(key)
    if isinstance(node, Enum):
        value = getattr(exc, "value", None)
        return ConfigError(
            f"{key}={value!r} is invalid; choose one of: "
            + ", ".join(m.value for m in type(node))
        )
    text = str(exc).strip().splitlines()[0]
    return ConfigError(f"{key}: {text}" if key else text)


def compose_config(overrides: str | Sequence[str] = ()) -> Any:
    """Compose ``conf/config.yaml`` with overrides into a typed DictConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException

    items = split_overrides(overrides)
    try:
        check_overrides(items)
        register_schema()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name=CONFIG_NAME, overrides=items)
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise explain(cause) from None
        raise ConfigError(mask_override(first_line(exc))) from None
    except OmegaConfBaseException as exc:
        raise explain(exc) from None
    except ConfigError:
        raise
    except (HydraException, OSError, ValueError) as exc:
        # Inputs Hydra was not written for (a 300-character key is taken for
        # a file name, a 5000-digit number): still one line.
        raise ConfigError(
            f"cannot use overrides {[mask_override(i)[:80] for i in items]}: "
            f"{mask_override(first_line(exc))[:200]}"
        ) from None


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (or its type name)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def to_app_config(values: Any) -> AppConfig:
    """Merge values into the typed schema and validate them."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AppConfig), values)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise explain(exc) from None
    assert isinstance(cfg, AppConfig)
    validate(cfg)
    return cfg


def load_config(overrides: str | Sequence[str] = ()) -> AppConfig:
    """Compose, type-check and validate the configuration.

    Raises:
        ConfigError: an unknown key, a bad group option or a bad value, in one
            line naming the key and what is valid.
    """
    return to_app_config(compose_config(overrides))


def config_message(cfg: AppConfig) -> str:
    """Return a composed config as JSON, for the ServerApp's run config ``config``.

    A server URL may hold a password: it is left out and travels as
    DATABASE_URL in the SuperLink's environment. A SQLite URL stays.
    """
    data = asdict(cfg)
    url = data["db"]["url"]
    if url and not url.startswith("sqlite"):
        data["db"]["url"] = None
    # JSON has quotes only in strings: a single one is escaped (\u0027), so
    # the text travels as one TOML literal string (flower.run_config_value).
    return json.dumps(data).replace("'", "\\u0027")


def config_from_message(text: str) -> AppConfig:
    """Rebuild the config ``config_message`` wrote, type-checked and validated."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"the run config's config is not JSON: {exc}") from None
    return to_app_config(values)


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
    url = resolve_database_url(cfg.db.url, cfg.db.sqlite_path)
    if cfg.db.require_backend == Backend.postgresql and not url.startswith(
        "postgresql"
    ):
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
    known.pop("db", None)
    cfg = to_app_config(known)
    cfg.db = current.db
    return cfg


def snapshot(cfg: AppConfig, **extra: Any) -> dict[str, Any]:
    """Return the config as a JSON-able dict with secrets removed."""
    data = asdict(cfg)
    if data["db"]["url"]:
        data["db"]["url"] = mask_url(data["db"]["url"])
    data.update(extra)
    return data
