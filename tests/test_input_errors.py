"""Bad input on every path: one ``error:`` line naming the value, no traceback.

Checkpoints given to ``evaluate``, strategy parameters out of range, one-class
training data, and a WAL-mode tracking database on a read-only medium. Fast
tier: no Flower, no training; the CLI runs in this process (``main`` maps our
errors exactly as the script does) except where a subprocess costs under a
second.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client_app.data import DataError, load_data, make_synthetic
from client_app.model import build_model
from client_app.trainer import save_checkpoint
from persistence import repositories as repo
from persistence.db import dispose_engines, get_engine, session_scope
from server_app.compose import load_config
from server_app.config import ConfigError
from tests.conftest import cli, run_cli, save_npz
from tests.factories import federated_run
from tests.mounts import read_only

HINT = "pass --checkpoint a best_model.pt saved by fedpneumo train or run"
CNN = {"name": "cnn", "width": 2, "dropout": 0.0, "norm": "batch"}
CNN_SPEC = "model.name=cnn model.width=2 model.dropout=0.0 model.norm=batch"
RESNET = {"name": "resnet18", "width": 2, "dropout": 0.0, "norm": "batch"}


def assert_one_error_line(out: str, err: str, expected: str) -> None:
    """The last stderr line is ``error: <expected...>``; no traceback anywhere."""
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {expected}"), last


def write_npz(path: Path, train_labels: np.ndarray, val_labels: np.ndarray) -> Path:
    """Write a MedMNIST-layout .npz with these labels and random 28 px images."""
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (len(train_labels), 28, 28), np.uint8),
        train_labels=train_labels.astype(np.uint8)[:, None],
        val_images=rng.integers(0, 256, (len(val_labels), 28, 28), np.uint8),
        val_labels=val_labels.astype(np.uint8)[:, None],
    )
    return path


def write_folder(root: Path, counts: dict[str, tuple[int, int]]) -> Path:
    """Write a Kermany folder: split -> (NORMAL, PNEUMONIA) image counts."""
    for split, per_class in counts.items():
        for cls, n in zip(("NORMAL", "PNEUMONIA"), per_class, strict=True):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (16, 16), 40 * i % 256).save(folder / f"{i}.png")
    return root


# --- 1. evaluate --checkpoint: missing, unreadable or mismatched files -------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small two-class .npz to evaluate on."""
    data = make_synthetic(n_train=20, n_val=20, seed=1)
    return save_npz(data, tmp_path_factory.mktemp("eval") / "eval.npz")


def saved(path: Path, model_spec: dict, weights_of: dict | None = None) -> Path:
    """Save a checkpoint declaring ``model_spec``, holding weights_of's weights."""
    model = build_model(**(weights_of or model_spec))
    return save_checkpoint(
        path, model, threshold=0.5, meta={"model": model_spec, "image_size": 28}
    )


def truncated(path: Path) -> Path:
    """A real checkpoint cut in half, as an interrupted copy leaves it."""
    whole = saved(path.with_name("whole.pt"), CNN).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def folder(path: Path) -> Path:
    """A folder where the file should be (a run's output folder, say)."""
    path.mkdir()
    return path


def random_bytes(path: Path) -> Path:
    """Bytes that are no file format at all."""
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def foreign_dict(path: Path) -> Path:
    """A valid torch file that is not fedpneumo's: a bare state_dict."""
    torch.save(build_model(**CNN).state_dict(), path)
    return path


def nan_weights(path: Path) -> Path:
    """A checkpoint whose weights are NaN (saved from a diverged run)."""
    model = build_model(**CNN)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return save_checkpoint(
        path, model, threshold=0.5, meta={"model": CNN, "image_size": 28}
    )


def infinite_threshold(path: Path) -> Path:
    """A checkpoint whose decision threshold is infinite."""
    return save_checkpoint(
        path,
        build_model(**CNN),
        threshold=float("inf"),
        meta={"model": CNN, "image_size": 28},
    )


CHECKPOINTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nan-weights": (
        nan_weights,
        "gives no usable predictions (20 of 20 probabilities are NaN or inf); "
        "its weights are not finite numbers",
    ),
    "infinite-threshold": (
        infinite_threshold,
        "has decision threshold inf; a saved model's threshold is a number "
        "between 0 and 1",
    ),
    "missing": (lambda p: p, "does not exist; " + HINT),
    "a-folder": (folder, "is a folder, not a file; " + HINT),
    "truncated": (
        truncated,
        "is not a PyTorch checkpoint (not a zip archive: truncated, or another "
        "kind of file); " + HINT,
    ),
    "random-bytes": (random_bytes, "is not a PyTorch checkpoint (not a zip archive"),
    "not-fedpneumo": (
        foreign_dict,
        "is not a fedpneumo checkpoint (no state_dict, threshold, model); " + HINT,
    ),
    "resnet18-weights-declared-cnn": (
        lambda p: saved(p, CNN, weights_of=RESNET),
        f"declares {CNN_SPEC} but holds resnet18 weights; expected that model's "
        "weights",
    ),
    "cnn-weights-declared-resnet18": (
        lambda p: saved(p, RESNET, weights_of=CNN),
        "declares model.name=resnet18 model.width=2 model.dropout=0.0 "
        "model.norm=batch but holds cnn weights",
    ),
    "weights-of-another-width": (
        lambda p: saved(p, CNN, weights_of={**CNN, "width": 4}),
        f"declares {CNN_SPEC} but holds weights of another size "
        "('features.0.0.weight' has shape [4, 1, 3, 3], the model's is [2, 1, 3, 3])",
    ),
    "unknown-model": (
        lambda p: saved(p, {**CNN, "name": "vgg"}, weights_of=CNN),
        "declares a model that cannot be built (model.name 'vgg' is not one of: "
        "cnn, resnet18); " + HINT,
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_evaluate_bad_checkpoint_is_one_line(
    case: str,
    tmp_path: Path,
    eval_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make, message = CHECKPOINTS[case]
    path = make(tmp_path / "best_model.pt")
    code, out, err = cli(
        monkeypatch, capsys, "evaluate", "--checkpoint", str(path), "--data",
        str(eval_data),
    )  # fmt: skip
    assert code == 2
    assert_one_error_line(out, err, f"checkpoint '{path}' {message}")


# --- 2. strategy.params out of range ----------------------------------------


STRATEGY_PARAM_CASES = [
    (
        "strategy=fedprox strategy.params.proximal_mu=-1",
        "proximal_mu=-1 is invalid; it must be >= 0",
    ),
    (
        "strategy=fedprox strategy.params.proximal_mu=nan",
        "proximal_mu=nan is invalid; it must be a finite number",
    ),
    (
        "strategy=fedprox strategy.params.proximal_mu=strong",
        "proximal_mu='strong' is invalid; it must be a number >= 0",
    ),
    (
        "strategy=fedadam strategy.params.eta=0",
        "eta=0 is invalid; it must be > 0",
    ),
    (
        "strategy=fedadam +strategy.params.eta_l=-0.1",
        "eta_l=-0.1 is invalid; it must be > 0",
    ),
    (
        "strategy=fedadagrad strategy.params.tau=0",
        "tau=0 is invalid; it must be > 0",
    ),
    (
        "strategy=fedadam +strategy.params.beta_1=1",
        "beta_1=1 is invalid; it must be in [0, 1)",
    ),
    (
        "strategy=fedyogi +strategy.params.beta_2=-0.5",
        "beta_2=-0.5 is invalid; it must be in [0, 1)",
    ),
    (
        "strategy=fedavgm strategy.params.server_learning_rate=0",
        "server_learning_rate=0 is invalid; it must be > 0",
    ),
    (
        "strategy=fedavgm strategy.params.server_momentum=1",
        "server_momentum=1 is invalid; it must be in [0, 1)",
    ),
    (
        "strategy=fedavgm strategy.params.server_momentum=true",
        "server_momentum=True is invalid; it must be a number in [0, 1)",
    ),
    (
        "strategy=fedtrimmedavg strategy.params.beta=0.5",
        "beta=0.5 is invalid; it must be in [0, 0.5)",
    ),
    (
        "strategy=krum strategy.params.num_malicious_nodes=-1",
        "num_malicious_nodes=-1 is invalid; it must be >= 0",
    ),
    (
        "strategy=bulyan strategy.params.num_malicious_nodes=1.5",
        "num_malicious_nodes=1.5 is invalid; it must be an integer >= 0",
    ),
    (
        "strategy=multikrum strategy.params.num_nodes_to_select=0",
        "num_nodes_to_select=0 is invalid; it must be >= 1",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    STRATEGY_PARAM_CASES,
    ids=[overrides.split()[-1] for overrides, _ in STRATEGY_PARAM_CASES],
)
def test_strategy_params_out_of_range_are_config_errors(
    overrides: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert str(err.value) == f"strategy.params.{message}"


def test_run_with_negative_proximal_mu_fails_before_flower(tmp_path: Path) -> None:
    result = run_cli(
        "run", "strategy=fedprox", "strategy.params.proximal_mu=-1", cwd=tmp_path,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: strategy.params.proximal_mu=-1 is invalid; it must be >= 0"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs" / "fedpneumo.db").exists()


# --- 3. training data holding one class --------------------------------------

TWO = np.arange(10) % 2
NEED = (
    "; training and selecting the best model by val AUROC need both NORMAL and "
    "PNEUMONIA images in train and val, so add the missing class"
)
ONE_CLASS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], str]]] = {
    "npz-train-all-pneumonia": (
        lambda d: write_npz(d / "x.npz", np.ones(40), TWO),
        lambda p: (
            f"the train split of '{p}' holds one class only (train_labels: "
            "0 of label 0 (NORMAL), 40 of label 1 (PNEUMONIA))" + NEED
        ),
    ),
    "npz-val-all-normal": (
        lambda d: write_npz(d / "x.npz", np.arange(40) % 2, np.zeros(10)),
        lambda p: (
            f"the val split of '{p}' holds one class only (val_labels: "
            "10 of label 0 (NORMAL), 0 of label 1 (PNEUMONIA))" + NEED
        ),
    ),
    "folder-empty-train-normal": (
        lambda d: write_folder(d / "xrays", {"train": (0, 6), "val": (2, 2)}),
        lambda p: (
            f"the train split of '{p}' holds one class only (train/NORMAL: "
            "0 images, train/PNEUMONIA: 6 images)" + NEED
        ),
    ),
    "folder-empty-val-pneumonia": (
        lambda d: write_folder(d / "xrays", {"train": (3, 3), "val": (2, 0)}),
        lambda p: (
            f"the val split of '{p}' holds one class only (val/NORMAL: "
            "2 images, val/PNEUMONIA: 0 images)" + NEED
        ),
    ),
}


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("case", list(ONE_CLASS))
def test_one_class_data_fails_before_training(
    case: str,
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make, message = ONE_CLASS[case]
    data = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "out"
    code, out, err = cli(
        monkeypatch,
        capsys,
        command,
        f"data.path={data}",
        f"outputs_dir={outputs}",
        f"db.sqlite_path={outputs / 't.db'}",
        "model.width=2",
        "train.epochs=1",
        # Were the data accepted, `run` would stop at the partition check (another
        # message) rather than start Flower on it.
        "simulation.num_supernodes=1000",
    )
    assert code == 2
    assert_one_error_line(out, err, message(data))
    assert not (outputs / "t.db").exists()  # checked before the database


def test_data_limit_that_drops_a_class_names_the_limit(tmp_path: Path) -> None:
    labels = np.r_[0, np.ones(39)]  # one NORMAL image in 40
    path = write_npz(tmp_path / "rare.npz", labels, TWO)
    assert len(load_data(str(path)).split("train")) == 40
    with pytest.raises(DataError) as err:
        load_data(str(path), limit=5)
    assert str(err.value) == (
        f"the train split of '{path}' holds one class only after data.limit=5 "
        "(train_labels: 0 of label 0 (NORMAL), 5 of label 1 (PNEUMONIA)); training "
        "and selecting the best model by val AUROC need both NORMAL and PNEUMONIA "
        "images in train and val, so raise data.limit"
    )


# --- 4. a WAL-mode database on a read-only medium ----------------------------


@pytest.fixture
def wal_database(sqlite_url: str) -> Path:
    """A tracking database in WAL mode with one completed run, no -wal beside it."""
    run_id = federated_run(sqlite_url, experiment="read-only-media")
    with session_scope(get_engine(sqlite_url)) as db:
        repo.update_run(db, run_id=run_id, num_rounds=3)
        repo.finish_run(db, run_id=run_id, status="completed")
    dispose_engines()  # the last connection checkpoints and removes -wal
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    assert path.read_bytes()[18:20] == b"\x02\x02"  # the header says WAL
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.mark.parametrize(
    ("command", "shown"),
    [(("runs", "list"), "read-only-media"), (("runs", "show", "1"), "0/3")],
)
def test_runs_read_a_wal_database_copied_to_read_only_media(
    command: tuple[str, ...], shown: str, wal_database: Path, tmp_path: Path
) -> None:
    files = {"tracking.db": wal_database.read_bytes()}
    with read_only(tmp_path / "media", files=files) as media:
        result = run_cli(*command, "--db", f"sqlite:///{media / 'tracking.db'}")
        left = sorted(p.name for p in media.iterdir())
    assert result.returncode == 0, result.stderr
    assert shown in result.stdout and "Traceback" not in result.stderr
    assert left == ["tracking.db"]


def test_runs_on_read_only_media_with_pending_wal_say_what_to_copy(
    wal_database: Path, tmp_path: Path
) -> None:
    # A writer that has not checkpointed yet: its changes live in -wal only.
    writer = sqlite3.connect(wal_database)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("UPDATE runs SET num_rounds = 7")
        writer.commit()
        wal = wal_database.with_name(wal_database.name + "-wal")
        assert wal.stat().st_size > 0
        files = {"t.db": wal_database.read_bytes(), "t.db-wal": wal.read_bytes()}
    finally:
        writer.close()
    with read_only(tmp_path / "media", files=files) as media:
        result = run_cli("runs", "list", "--db", f"sqlite:///{media / 't.db'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: database file {media / 't.db'} cannot be read here: SQLite cannot "
        "create t.db-shm beside it and t.db-wal holds changes not yet in the file; "
        "copy t.db-shm along with it, or checkpoint it where it was written "
        "(sqlite3 t.db 'PRAGMA wal_checkpoint(TRUNCATE)') and copy the .db file "
        "alone"
    ]


def test_evaluate_json_is_strict_json_when_a_metric_is_undefined(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = make_synthetic(n_train=10, n_val=12, seed=2)
    data.splits["val"].labels[:] = 0  # one class: AUROC is undefined
    path = save_npz(data, tmp_path / "one-class.npz")
    checkpoint = saved(tmp_path / "best_model.pt", CNN)
    code, out, err = cli(
        monkeypatch, capsys, "evaluate", "--checkpoint", str(checkpoint),
        "--data", str(path), "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "NaN" not in out
    metrics = json.loads(out)
    assert metrics["auroc"] is None and metrics["accuracy"] is not None


# --- evaluate on a file that holds only the split it scores -----------------


def only_test_split(tmp_path: Path, kind: str) -> Path:
    """A test-only .npz, or an image folder with only test/."""
    if kind == "folder":
        return write_folder(tmp_path / "xrays", {"test": (4, 5)})
    data = make_synthetic(n_train=10, n_val=10, seed=4)
    test = data.splits["val"]
    path = tmp_path / "test-only.npz"
    np.savez(path, test_images=test.images, test_labels=test.labels)
    return path


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_evaluate_a_file_that_holds_only_the_test_split(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = only_test_split(tmp_path, kind)
    checkpoint = saved(tmp_path / "best_model.pt", CNN)
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data)]
    code, out, err = cli(monkeypatch, capsys, *args, "--split", "test", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["num_samples"] == (9 if kind == "folder" else 10)
    code, out, err = cli(monkeypatch, capsys, *args, "--split", "val")
    assert code == 2
    assert_one_error_line(out, err, "split 'val' is not in ")
    assert err.strip().endswith("available splits: test")
