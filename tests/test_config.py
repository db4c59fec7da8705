"""Hydra configuration: every group option composes; bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedpneumo.flower import free_port, run_config_value
from server_app.compose import (
    config_from_message,
    config_from_snapshot,
    config_message,
    database_url,
    group_options,
    load_config,
    resolve_paths,
    snapshot,
    split_overrides,
)
from server_app.config import ConfigError
from tests.conftest import cli

GROUPS = ("data", "model", "train", "partition", "strategy", "db")


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in group_options(g)]
    + [f"+experiment={o}" for o in group_options("experiment")],
)
def test_every_group_option_composes(
    override: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@h/db")
    cfg = load_config([override])
    assert cfg.num_rounds >= 1 and cfg.simulation.num_supernodes >= 1


def test_strategy_group_mirrors_flower() -> None:
    assert group_options("strategy") == sorted(
        [
            "bulyan",
            "fedadagrad",
            "fedadam",
            "fedavg",
            "fedavgm",
            "fedmedian",
            "fedprox",
            "fedtrimmedavg",
            "fedyogi",
            "krum",
            "multikrum",
            "qfedavg",
        ]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("nope=1", "unknown config key 'nope'; valid keys: experiment_name"),
        ("train.nope=1", "unknown config key 'train.nope'; valid keys under train:"),
        (
            "model=vgg",
            "model='vgg' is not a valid option; choose one of: cnn, resnet18",
        ),
        ("train.batch_size=big", "train.batch_size: Value 'big'"),
        ("partition.alpha=0", "partition.alpha=0.0 is invalid; it must be > 0"),
        ("strategy.fraction_train=1.5", "strategy.fraction_train=1.5 is invalid"),
        ("train.lr=nan", "train.lr=nan is invalid; it must be a finite number"),
        ("tracking.client_writes=email", "choose one of: direct, relay"),
        (
            "strategy=fedprox strategy.params.proximal_mu=0.1 +strategy.params.mu=1",
            "strategy.params.mu=1 is invalid; FedProx accepts:",
        ),
        ("'unbalanced=quote", "cannot parse overrides"),
        ("seed=1)", "cannot parse overrides"),
        ("strategy=fedavg,fedprox", "is a sweep: run it with --multirun (-m)"),
    ],
)
def test_bad_overrides_name_the_key(overrides: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_string_keeps_quoted_values() -> None:
    assert split_overrides("a=1 'b=x y'") == ["a=1", "b=x y"]


def test_database_url_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    cfg = load_config(["db.sqlite_path=/tmp/x.db"])
    assert database_url(cfg) == "sqlite:////tmp/x.db"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@h/db")
    assert database_url(cfg) == "postgresql://u:p@h/db"
    cfg = load_config(["db.url=sqlite:////tmp/y.db"])
    assert database_url(cfg) == "sqlite:////tmp/y.db"
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConfigError, match="db=postgres needs a PostgreSQL URL"):
        database_url(load_config(["db=postgres"]))


def test_snapshot_hides_the_password_and_round_trips() -> None:
    cfg = load_config(["db.url=postgresql://alice:s3cret@h/db", "strategy=fedprox"])
    data = json.loads(json.dumps(snapshot(cfg, synthetic=False)))
    assert "s3cret" not in json.dumps(data) and data["synthetic"] is False
    current = load_config(["db.url=sqlite:////tmp/z.db"])
    again = config_from_snapshot(data, current)
    assert again.strategy == cfg.strategy and again.db.url == "sqlite:////tmp/z.db"


def test_the_config_sent_to_the_server_app_round_trips_without_a_password() -> None:
    cfg = resolve_paths(
        load_config(["db.url=postgresql://alice:s3cret@h/db", "strategy=fedprox"])
    )
    cfg = replace(cfg, experiment_name='Bob\'s "quoted" run', num_rounds=7)
    text = config_message(cfg)
    assert "s3cret" not in text and "alice" not in text
    # Read back as `flwr run --run-config` reads it, with Flower's own parser.
    received = parse_config_args([f"config={run_config_value(text)}"])["config"]
    assert config_from_message(received) == replace(cfg, db=replace(cfg.db, url=None))
    # A SQLite URL holds no secret: the ServerApp uses the same file.
    local = load_config(["db.url=sqlite:////tmp/y.db"])
    assert config_from_message(config_message(local)).db.url == "sqlite:////tmp/y.db"
    with pytest.raises(ConfigError, match="not JSON"):
        config_from_message("{strategy: fedprox")


def test_the_server_app_loads_without_hydra() -> None:
    # `fedpneumo run` sends the composed config: the ServerApp does not pay
    # Hydra's import while the simulation starts.
    probe = "import sys, server_app.app; print('hydra' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "x" * 300 + "=1"], "error: cannot use overrides ['xxxxxxxx"),
        (["train", "train.lr=" + "1" * 5000], "error: cannot use overrides"),
        (
            ["train", "seed=99999999999999999999999"],
            "error: seed=99999999999999999999999 is invalid; "
            "it must be in [0, 4294967295]",
        ),
        (
            ["run", "-m", "train.lr=range(1,3),abc"],
            "error: cannot expand the sweep 'train.lr=range(1,3),abc'",
        ),
        (["run", "-m", "train.lr=glob(*)"], "error: cannot expand the sweep"),
        (
            ["train", "db.url=postgresql://u:secretpw@127.0.0.1:1/x", "foo"],
            "error: cannot parse overrides ['db.url=postgresql://u:***@127.0.0.1:1/x'",
        ),
        (
            ["train", "train.device=cuda"],
            "error: train.device=cuda but this machine has no CUDA GPU",
        ),
        (
            ["run", "-m", "strategy=fedavg,bogus"],
            "error: strategy='bogus' is not a valid option",
        ),
    ],
    ids=[
        "long-key",
        "huge-number",
        "huge-seed",
        "odd-sweep",
        "glob-sweep",
        "password",
        "no-cuda",
        "sweep-bad-second",
    ],
)
def test_odd_overrides_are_one_line_and_leave_nothing(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 2, out + err
    assert "Traceback" not in out + err and "secretpw" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "outputs").exists()  # no database, no folder


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["simulation.ray_address=nohost"],
            "error: simulation.ray_address='nohost' is invalid; give the Ray head's "
            "host:port (the --port of `ray start --head`), or null for Flower's own "
            "local Ray",
        ),
        (
            ["simulation.ray_address=127.0.0.1:6379", "simulation.num_cpus=2"],
            "error: simulation.num_cpus=2 sizes Flower's own Ray, but "
            "simulation.ray_address=127.0.0.1:6379 uses a running cluster, whose "
            "size is its nodes'; set simulation.num_cpus=null",
        ),
        (
            ["simulation.ray_address=127.0.0.1:{port}"],
            "error: simulation.ray_address=127.0.0.1:{port}: no Ray cluster answers "
            "there (Connection refused); start one with `ray start --head "
            "--port={port}`, or set simulation.ray_address=null for Flower's own "
            "local Ray",
        ),
    ],
    ids=["not-host-port", "with-num-cpus", "nothing-listening"],
)
def test_a_ray_address_that_cannot_work_stops_the_run_first(
    overrides: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = str(free_port())  # nothing listens there
    args = [o.replace("{port}", port) for o in overrides]
    code, _, err = cli(monkeypatch, capsys, "run", *args, f"outputs_dir={tmp_path}")
    assert code == 2
    assert err.strip().splitlines() == [message.replace("{port}", port)]
    assert not (tmp_path / "fedpneumo.db").exists()
