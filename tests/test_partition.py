"""Splitting the training data among simulated hospitals (client_app/partition.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client_app.data import SYNTHETIC, DataError, make_synthetic
from client_app.partition import (
    PartitionSpec,
    client_split,
    draw_partitions,
    kept_partitions,
)
from server_app.compose import load_config, resolve_paths
from server_app.config import ConfigError
from server_app.factories import check_partitions, configured_data, instructions

NAMES = ("iid", "dirichlet", "pathological")


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return make_synthetic(n_train=300, n_val=0, seed=1).split("train").labels


def make_spec(**changes: object) -> PartitionSpec:
    spec = PartitionSpec(
        data_path=SYNTHETIC,
        limit=None,
        image_size=28,
        seed=0,
        name="iid",
        alpha=0.5,
        classes_per_client=1,
        min_partition_size=10,
        num_partitions=5,
        partition_seed=1,
        val_fraction=0.1,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_every_row_goes_to_exactly_one_client(name: str, labels: np.ndarray) -> None:
    # partition_seed=1 assigns both classes under pathological(classes=1).
    parts = draw_partitions(make_spec(name=name, num_partitions=5), labels)
    assert len(parts) == 5
    assert all(p.dtype == np.int64 for p in parts)
    rows = np.concatenate(parts)
    assert sum(len(p) for p in parts) == len(labels)
    assert len(np.unique(rows)) == len(rows)  # no row twice
    assert set(rows.tolist()) == set(range(len(labels)))


@pytest.mark.parametrize("name", NAMES)
def test_the_draw_is_deterministic_for_a_seed(name: str, labels: np.ndarray) -> None:
    spec = make_spec(name=name)
    first = draw_partitions(spec, labels)
    again = draw_partitions(spec, labels)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_another_partition_seed_draws_other_partitions(
    name: str, labels: np.ndarray
) -> None:
    one = draw_partitions(make_spec(name=name, partition_seed=1), labels)
    other = draw_partitions(make_spec(name=name, partition_seed=2), labels)
    assert any(not np.array_equal(a, b) for a, b in zip(one, other, strict=True))


def test_iid_gives_equal_shuffled_shares(labels: np.ndarray) -> None:
    parts = draw_partitions(make_spec(name="iid", num_partitions=3), labels)
    assert [len(p) for p in parts] == [100, 100, 100]
    assert not np.array_equal(parts[0], np.arange(100))  # shuffled, not in order
    for part in parts:  # ~70 % pneumonia everywhere
        assert 0.5 < labels[part].mean() < 0.9


def test_dirichlet_respects_the_minimum_partition_size(labels: np.ndarray) -> None:
    parts = draw_partitions(
        make_spec(name="dirichlet", alpha=0.3, min_partition_size=15), labels
    )
    assert min(len(p) for p in parts) >= 15


def test_pathological_gives_each_client_one_class(labels: np.ndarray) -> None:
    parts = draw_partitions(
        make_spec(name="pathological", classes_per_client=1), labels
    )
    assert all(len(np.unique(labels[p])) == 1 for p in parts)


def test_too_few_images_is_reported_with_the_keys_to_change(
    labels: np.ndarray,
) -> None:
    spec = make_spec(num_partitions=40, min_partition_size=10)
    with pytest.raises(DataError) as info:
        draw_partitions(spec, labels)
    message = str(info.value)
    assert "simulation.num_supernodes=40 needs at least 400 training images" in message
    assert "partition.min_partition_size=10" in message
    assert "there are 300" in message


def test_an_infeasible_dirichlet_draw_is_reported(labels: np.ndarray) -> None:
    spec = make_spec(name="dirichlet", alpha=0.001, num_partitions=20)
    with pytest.raises(DataError) as info:
        draw_partitions(spec, labels)
    message = str(info.value)
    assert message.startswith("partition.alpha=0.001 could not give all 20 clients")
    assert "in 10 draws" in message
    assert "another partition.seed" in message


def test_an_unknown_partition_name_is_rejected(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="'shards' is not one of iid"):
        draw_partitions(make_spec(name="shards"), labels)


def test_client_split_holds_out_the_val_fraction() -> None:
    spec = make_spec(name="iid", num_partitions=4, val_fraction=0.1)
    train_rows = make_synthetic(image_size=28).split("train")
    parts = draw_partitions(spec, train_rows.labels)
    for pid, rows in enumerate(parts):
        train, val = client_split(spec, pid)
        assert len(train) + len(val) == len(rows)
        assert len(val) == round(len(rows) * 0.1)
        # The client's images are exactly its partition's rows.
        together = np.concatenate([train.images, val.images])
        expected = train_rows.images[np.sort(rows)]
        assert sorted(map(bytes, together)) == sorted(map(bytes, expected))


def test_client_split_keeps_at_least_one_val_image() -> None:
    spec = make_spec(name="iid", num_partitions=4, val_fraction=0.001)
    train, val = client_split(spec, 0)
    assert len(val) == 1 and len(train) == 99


def test_client_split_rejects_an_unknown_partition_id() -> None:
    with pytest.raises(ValueError, match=r"partition-id 4 is outside 0\.\.3"):
        client_split(make_spec(num_partitions=4), 4)


def test_check_partitions_returns_each_clients_share(
    labels: np.ndarray, tmp_path: Path
) -> None:
    cfg = load_config(
        ["partition=iid", "simulation.num_supernodes=4", f"outputs_dir={tmp_path}"]
    )
    assert check_partitions(cfg, labels) == [75, 75, 75, 75]


def test_clients_read_the_launchers_draw_without_importing_datasets(
    data_file: Path, tmp_path: Path
) -> None:
    cfg = resolve_paths(
        load_config(
            [
                f"data.path={data_file}",
                "simulation.num_supernodes=3",
                f"outputs_dir={tmp_path}",
            ]
        )
    )
    train = configured_data(cfg).split("train")
    sizes = check_partitions(cfg, train.labels)
    (kept,) = (tmp_path / "partitions").iterdir()
    spec = PartitionSpec.from_instructions(
        instructions(cfg, run_id=0, url=None), len(sizes), str(data_file)
    )
    assert kept == kept_partitions(spec, train.labels, tmp_path)
    # A client process: the kept draw first, then a draw of its own.
    probe = f"""
import sys
from pathlib import Path
from client_app.partition import PartitionSpec, client_split, partition_indices
spec = {spec!r}
kept = [client_split(spec, i, Path({str(tmp_path)!r})) for i in range({len(sizes)})]
print("datasets" in sys.modules)
partition_indices.cache_clear()
drawn = [client_split(spec, i) for i in range({len(sizes)})]
same = all(
    (a.images == b.images).all() and (a.labels == b.labels).all()
    for k, d in zip(kept, drawn) for a, b in zip(k, d)
)
print([len(t) + len(v) for t, v in kept], same)
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    imported, shares = result.stdout.split("\n")[:2]
    assert imported == "False"
    assert shares == f"{sizes} True"
    # Another setting, or other labels, never reads this draw.
    assert kept_partitions(replace(spec, alpha=0.3), train.labels, tmp_path) != kept
    assert kept_partitions(spec, train.labels[::-1].copy(), tmp_path) != kept


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["simulation.num_supernodes=50"],
            "simulation.num_supernodes=50 needs at least 500 training images",
        ),
        (
            ["partition.alpha=0.001", "simulation.num_supernodes=20"],
            "partition.alpha=0.001 could not give all 20 clients",
        ),
    ],
)
def test_check_partitions_raises_a_config_error(
    labels: np.ndarray, overrides: list[str], expected: str
) -> None:
    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match=expected):
        check_partitions(cfg, labels)


@pytest.mark.parametrize("seed", range(8))
def test_pathological_uses_every_class_whatever_the_seed(seed: int) -> None:
    labels = np.array([0] * 90 + [1] * 210)
    spec = make_spec(
        name="pathological", classes_per_client=1, num_partitions=2, partition_seed=seed
    )
    rows = draw_partitions(spec, labels)
    assert sorted(len(r) for r in rows) == [90, 210]  # no image is left unused
    assert {int(labels[r[0]]) for r in rows} == {0, 1}


def test_partitioners_leave_a_later_full_flwr_datasets_import_working() -> None:
    # A fresh interpreter: the partitioners load without the package's plotting
    # modules, and a later `import flwr_datasets` still runs its __init__.
    code = (
        "import sys\n"
        "from client_app.partition import partitioners\n"
        "found = partitioners()\n"
        "assert 'seaborn' not in sys.modules, 'plotting helpers were imported'\n"
        "import flwr_datasets\n"
        "assert flwr_datasets.FederatedDataset\n"
        "assert flwr_datasets.partitioner is found\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
