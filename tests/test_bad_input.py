"""Bad input: one clear line naming the value, a non-zero exit, no half-written rows,
and never a password in the output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from persistence.db import get_engine, session_scope, upgrade_database
from tests.conftest import run_cli
from tests.pg_server import ThrowawayPostgres

QUICK = ("data.limit=200", "model.width=8", "train.epochs=1")
DIVERGE = (
    "model.norm=none",
    "train.optimizer=sgd",
    "train.lr=1e6",
    "train.batch_size=8",
)

# Every test here starts Flower or trains: the e2e tier.
pytestmark = pytest.mark.e2e


def corrupt_npz(folder: Path) -> str:
    path = folder / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    return str(path)


def misshaped_npz(folder: Path) -> str:
    path = folder / "flat.npz"
    np.savez(
        path,
        train_images=np.zeros((10, 784), np.uint8),
        train_labels=np.zeros((10, 1), np.uint8),
        val_images=np.zeros((5, 28, 28), np.uint8),
        val_labels=np.zeros((5, 1), np.uint8),
    )
    return str(path)


def bad_labels_npz(folder: Path) -> str:
    path = folder / "labels.npz"
    np.savez(
        path,
        train_images=np.zeros((10, 28, 28), np.uint8),
        train_labels=np.array([0, 1, 2, 0, 1, 0, 1, 0, 1, 7], np.uint8)[:, None],
        val_images=np.zeros((4, 28, 28), np.uint8),
        val_labels=np.array([0, 1, 0, 1], np.uint8)[:, None],
    )
    return str(path)


def folder_without_classes(folder: Path) -> str:
    for split in ("train", "val"):
        (folder / "xrays" / split / "healthy").mkdir(parents=True)
    return str(folder / "xrays")


@dataclass
class Case:
    """One bad input and what the user must see."""

    args: Callable[[Path, Path], list[str]]
    code: int
    message: str
    db: str = "good"  # good | unreachable | wrong-password | unknown-revision
    extra: list[str] = field(default_factory=list)


CASES = {
    "unknown-key": Case(lambda d, t: ["run", "foo=1"], 2, "unknown config key 'foo'"),
    "bad-type": Case(
        lambda d, t: ["train", "train.lr=fast"], 2, "train.lr: Value 'fast'"
    ),
    "bad-group-option": Case(
        lambda d, t: ["run", "strategy=fedprx"],
        2,
        "strategy='fedprx' is not a valid option; choose one of: bulyan",
    ),
    "bad-alpha": Case(
        lambda d, t: ["run", "partition.alpha=-1"], 2, "partition.alpha=-1.0 is invalid"
    ),
    "bad-fraction": Case(
        lambda d, t: ["run", "strategy.fraction_train=0"],
        2,
        "strategy.fraction_train=0.0 is invalid; it must be in (0, 1]",
    ),
    "more-clients-than-samples": Case(
        lambda d, t: [
            "run",
            f"data.path={d}",
            "data.limit=50",
            "simulation.num_supernodes=20",
        ],
        2,
        "simulation.num_supernodes=20 needs at least 200 training images",
    ),
    "infeasible-dirichlet-skew": Case(
        lambda d, t: [
            "run",
            f"data.path={d}",
            "partition=dirichlet",
            "partition.alpha=0.05",
        ],
        2,
        "partition.alpha=0.05 could not give all 10 clients at least "
        "partition.min_partition_size=10",
    ),
    "missing-data-file": Case(
        lambda d, t: ["train", f"data.path={t / 'missing.npz'}"],
        2,
        "missing.npz' does not exist",
    ),
    "corrupt-data-file": Case(
        lambda d, t: ["train", f"data.path={corrupt_npz(t)}"],
        2,
        "is not a readable .npz file",
    ),
    "misshaped-data-file": Case(
        lambda d, t: ["train", f"data.path={misshaped_npz(t)}"], 2, "train_images"
    ),
    "labels-out-of-range": Case(
        lambda d, t: ["train", f"data.path={bad_labels_npz(t)}"],
        2,
        "labels outside {0,1} in train_labels",
    ),
    "folder-without-classes": Case(
        lambda d, t: ["train", f"data.path={folder_without_classes(t)}"],
        2,
        "NORMAL",
    ),
    "centralized-diverges": Case(
        lambda d, t: ["train", f"data.path={d}", *QUICK, *DIVERGE],
        1,
        "training diverged at epoch 1: train loss is nan with train.lr=1e+06",
    ),
    "unreachable-database": Case(
        lambda d, t: ["train", f"data.path={d}", *QUICK],
        1,
        "server unreachable (connection refused)",
        db="unreachable",
    ),
    "wrong-credentials": Case(
        lambda d, t: ["run", f"data.path={d}", *QUICK, "simulation.num_supernodes=2"],
        1,
        "wrong user name or password",
        db="wrong-password",
    ),
    "unknown-schema-revision": Case(
        lambda d, t: ["train", f"data.path={d}", *QUICK],
        1,
        "has schema migration 'f00dbeef', which this fedpneumo does not know",
        db="unknown-revision",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(
    name: str, pg_server: ThrowawayPostgres, tmp_path: Path, data_file: Path
) -> None:
    case = CASES[name]
    url = pg_server.create_database()
    upgrade_database(url)
    env_url = url
    if case.db == "unreachable":
        env_url = f"postgresql://fedpneumo:{pg_server.password}@127.0.0.1:1/none"
    elif case.db == "wrong-password":
        env_url = pg_server.url(
            url.rsplit("/", 1)[1], password="not-" + pg_server.password
        )
    elif case.db == "unknown-revision":
        with session_scope(get_engine(url)) as s:
            s.execute(text("UPDATE alembic_version SET version_num = 'f00dbeef'"))

    result = run_cli(
        *case.args(data_file, tmp_path),
        f"outputs_dir={tmp_path / 'out'}",
        env={"DATABASE_URL": env_url},
    )
    output = result.stdout + result.stderr
    assert result.returncode == case.code, output[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and case.message in errors[0], output[-3000:]
    assert pg_server.password not in output
    for log in (tmp_path / "out").rglob("*.log"):
        assert pg_server.password not in log.read_text()

    with session_scope(get_engine(url)) as s:
        orphans = s.execute(
            text(
                "SELECT count(*) FROM run_metrics m "
                "LEFT JOIN runs r ON r.id = m.run_id WHERE r.id IS NULL"
            )
        ).scalar_one()
        assert orphans == 0
        runs = s.execute(text("SELECT status, end_time, error_message FROM runs")).all()
        # A run that started ends failed with the reason; none is left dangling.
        for status, end_time, error in runs:
            assert status == "failed" and end_time is not None and error
        if "diverges" in name:
            assert len(runs) == 1 and "diverged" in runs[0][2]
        else:
            assert runs == []
        configs = s.execute(text("SELECT config FROM runs")).all()
        assert all(pg_server.password not in str(c) for c in configs)
