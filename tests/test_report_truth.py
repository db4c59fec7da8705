"""Reports that keep the README's promises on every path (fast unit tier).

Bad output paths end in one ``error:`` line with exit code 2 and leave no
file; synthetic runs are marked wherever a run is shown; "best" is the best
of its own metric; plot legends tell runs apart; centralized runs store their
epochs done; the ETA leaves the start-up out. Runs are made with the real
repositories in real SQLite files; the CLI runs in this process (one case also
as a real subprocess).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from client_app.metrics_collector import MetricsCollectorCallback
from fedpneumo.cli import main
from fedpneumo.plots import make_figure, plot_formats
from fedpneumo.progress import EtaEstimator, ProgressReporter
from fedpneumo.reports import load_runs
from fedpneumo.summary import print_centralized_summary, print_federated_summary
from persistence import repositories as repo
from persistence.db import get_engine, session_scope
from persistence.models import Run, RunStatus
from persistence.repositories import MetricPoint
from tests.conftest import run_cli
from tests.mounts import full, read_only, tmpfs

REAL_CONFIG = {"seed": 1, "train": {"lr": 0.001}, "data": {"path": "/data/x.npz"}}
SYNTHETIC_CONFIG = {**REAL_CONFIG, "synthetic": True, "data_source": "synthetic"}
# Server evaluations of a federated run, by round: the best AUROC (round 3)
# has neither the lowest loss (round 2) nor the highest accuracy (round 1).
EVALS = {
    1: {"loss": 0.50, "accuracy": 0.80, "auroc": 0.70},
    2: {"loss": 0.30, "accuracy": 0.60, "auroc": 0.80},
    3: {"loss": 0.40, "accuracy": 0.70, "auroc": 0.90},
}
TRAIN_LOSS = {1: 0.60, 2: 0.20, 3: 0.35}


# Runs, made with the real repositories -------------------------------------


def federated(
    url: str,
    *,
    config: dict[str, Any] | None = None,
    evals: dict[int, dict[str, float]] | None = None,
) -> int:
    """Create a completed federated run with server evaluations; return its id."""
    evals = EVALS if evals is None else evals
    with session_scope(get_engine(url)) as db:
        experiment = repo.get_or_create_experiment(db, name="truth").id
        run = repo.create_run(
            db,
            experiment_id=experiment,
            training_mode="federated",
            strategy="fedavg",
            partition="dirichlet(alpha=0.5)",
            num_rounds=len(evals),
            rounds_completed=len(evals),
            config=config or REAL_CONFIG,
        )
        for rnd, metrics in evals.items():
            repo.add_server_evaluation(
                db, run_id=run.id, round_number=rnd, metrics=metrics
            )
        points = [
            MetricPoint("train_loss", TRAIN_LOSS[r], r, "train", r)
            for r in evals
            if r in TRAIN_LOSS
        ]
        repo.add_metrics(db, run_id=run.id, client_id=None, points=points)
        repo.finish_run(db, run_id=run.id, status=RunStatus.COMPLETED)
        return run.id


def centralized(url: str, *, config: dict[str, Any] | None = None) -> int:
    """Create a completed centralized run with two epochs; return its id."""
    with session_scope(get_engine(url)) as db:
        experiment = repo.get_or_create_experiment(db, name="truth").id
        run = repo.create_run(
            db,
            experiment_id=experiment,
            training_mode="centralized",
            num_rounds=2,
            config=config or REAL_CONFIG,
        )
        points = [
            MetricPoint(name, value, epoch, "val" if "val" in name else "train")
            for epoch in (1, 2)
            for name, value in (("train_loss", 0.5 / epoch), ("val_auroc", 0.8))
        ]
        repo.add_metrics(db, run_id=run.id, client_id=None, points=points)
        repo.finish_run(db, run_id=run.id, status=RunStatus.COMPLETED)
        return run.id


# The CLI, in this process ---------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What one CLI call did: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """Return a function that runs ``fedpneumo ARGS`` through the real main()."""
    monkeypatch.delenv("COLUMNS", raising=False)  # wide, unwrapped tables

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["fedpneumo", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(bool(exc.code))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    yield invoke


def table_rows(text: str) -> dict[str, list[str]]:
    """Return the body rows of rich tables, by their first cell."""
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]
    return {row[0]: row[1:] for row in rows if row}


# 1 and 2: output files -------------------------------------------------------

FORMATS = ", ".join(f".{f}" for f in plot_formats())


@dataclass(frozen=True)
class BadOutput:
    """A ``runs plot`` / ``runs export`` call whose output cannot be written."""

    name: str
    command: tuple[str, ...]
    # "read-only", "full" (no space left), "missing" (folder), "file" (the
    # parent is a file) or "tmp" (a writable folder)
    where: str
    filename: str
    message: str  # the expected line; {path} and {folder} are filled in


BAD_OUTPUTS = [
    BadOutput(
        "plot-read-only",
        ("plot",),
        "read-only",
        "curves.png",
        "error: --output {path} cannot be written (read-only file system); "
        "give a path in a writable folder",
    ),
    BadOutput(
        "plot-disk-full",
        ("plot",),
        "full",
        "curves.png",
        "error: --output {path} cannot be written (no space left on device); "
        "give a path in a writable folder",
    ),
    BadOutput(
        "plot-unsupported-extension",
        ("plot",),
        "tmp",
        "curves.xyz",
        f"error: --output {{path}} has extension .xyz; use one of {FORMATS}",
    ),
    BadOutput(
        "plot-no-extension",
        ("plot",),
        "tmp",
        "curves",
        f"error: --output {{path}} has no extension; use one of {FORMATS}",
    ),
    BadOutput(
        "plot-missing-folder",
        ("plot",),
        "missing",
        "curves.png",
        "error: --output {path}: folder {folder} does not exist; "
        "create it first or give a path in an existing folder",
    ),
    BadOutput(
        "export-csv-read-only",
        ("export", "--format", "csv"),
        "read-only",
        "run.csv",
        "error: --output {path} cannot be written (read-only file system); "
        "give a path in a writable folder",
    ),
    BadOutput(
        "export-json-read-only",
        ("export", "--format", "json"),
        "read-only",
        "run.json",
        "error: --output {path} cannot be written (read-only file system); "
        "give a path in a writable folder",
    ),
    BadOutput(
        "export-json-disk-full",
        ("export", "--format", "json"),
        "full",
        "run.json",
        "error: --output {path} cannot be written (no space left on device); "
        "give a path in a writable folder",
    ),
    BadOutput(
        "export-csv-missing-folder",
        ("export", "--format", "csv"),
        "missing",
        "run.csv",
        "error: --output {path}: folder {folder} does not exist; "
        "create it first or give a path in an existing folder",
    ),
    BadOutput(
        "export-json-missing-folder",
        ("export", "--format", "json"),
        "missing",
        "run.json",
        "error: --output {path}: folder {folder} does not exist; "
        "create it first or give a path in an existing folder",
    ),
    BadOutput(
        "export-parent-is-a-file",
        ("export", "--format", "json"),
        "file",
        "run.json",
        "error: --output {path}: {folder} is not a folder; "
        "give a path inside an existing folder",
    ),
]


def files_under(folder: Path) -> list[Path]:
    """Return every file and folder under folder but the database's files."""
    return sorted(p for p in folder.rglob("*") if "tracking.db" not in p.name)


@pytest.mark.parametrize("case", BAD_OUTPUTS, ids=lambda c: c.name)
def test_unwritable_output_is_one_error_line_and_no_file(
    case: BadOutput, cli: Any, sqlite_url: str, tmp_path: Path
) -> None:
    run_id = federated(sqlite_url)
    if case.where == "read-only":
        context: Any = read_only(tmp_path / "read-only")
    elif case.where == "full":
        context = full(tmp_path / "full")
    else:
        context = _plain(tmp_path / "out")
    with context as base:
        folder = {
            "read-only": base,
            "full": base,
            "tmp": base,
            "missing": base / "no" / "such",
            "file": base / "a-file",
        }[case.where]
        if case.where == "file":
            folder.write_text("not a folder")
        path = folder / case.filename
        before = files_under(tmp_path)
        result = cli(
            "runs", *case.command, str(run_id), "-o", str(path), "--db", sqlite_url
        )
        expected = case.message.format(path=path, folder=folder)
        assert (result.code, result.err, result.out) == (2, expected + "\n", "")
        assert "Traceback" not in result.err + result.out
        assert not path.exists()
        assert files_under(tmp_path) == before, "a partial or temporary file stayed"
        assert not (base / "no").exists(), "a missing folder was created"


@contextmanager
def _plain(folder: Path) -> Iterator[Path]:
    """A plain writable folder, in the shape of the read_only() mount."""
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def test_unwritable_plot_from_a_real_process_is_one_line(
    sqlite_url: str, read_only_dir: Path
) -> None:
    """The console script itself: one line on stderr, exit 2, no traceback."""
    run_id = federated(sqlite_url)
    path = read_only_dir / "curves.png"
    result = run_cli("runs", "plot", str(run_id), "-o", str(path), "--db", sqlite_url)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --output {path} cannot be written (read-only file system); "
        "give a path in a writable folder"
    ]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("command", "name", "magic"),
    [
        (("plot",), "curves.svg", b"<?xml"),
        (("plot",), "curves.PDF", b"%PDF"),  # the extension picks the format
        (("export", "--format", "csv"), "run.csv", b"table,"),
        (("export", "--format", "json"), "run.json", b"{"),
    ],
    ids=["plot-svg", "plot-pdf", "export-csv", "export-json"],
)
def test_a_failed_write_keeps_the_existing_file_whole(
    command: tuple[str, ...],
    name: str,
    magic: bytes,
    cli: Any,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """Write a file, make it small, fill the disk, write again: it survives.

    Writing in place would truncate the small file and leave the part of the
    new one that fitted.
    """
    run_id = federated(sqlite_url)
    with session_scope(get_engine(sqlite_url)) as db:
        # Exports of several pages: more than the small file's space frees.
        points = [MetricPoint(f"extra_{i}", i / 7, 1, "val", 1) for i in range(200)]
        repo.add_metrics(db, run_id=run_id, client_id=None, points=points)
    with tmpfs(tmp_path / "disk", "1m") as folder:
        path = folder / name
        args = ("runs", *command, str(run_id), "-o", str(path), "--db", sqlite_url)
        assert cli(*args).code == 0
        assert path.read_bytes().startswith(magic)
        assert [p.name for p in folder.iterdir()] == [name]  # no temporary file
        path.write_bytes(b"previous\n")
        fill(folder)
        result = cli(*args)
        assert (result.code, result.out, result.err) == (
            2,
            "",
            f"error: --output {path} cannot be written (no space left on device); "
            "give a path in a writable folder\n",
        )
        assert path.read_bytes() == b"previous\n", "the existing file was damaged"
        assert sorted(p.name for p in folder.iterdir()) == [".filler", name]


def fill(folder: Path) -> None:
    """Fill the file system of folder until no space is left."""
    with (folder / ".filler").open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass  # no space left: the point


# 3: synthetic runs are marked -----------------------------------------------


def test_list_marks_synthetic_runs_only(cli: Any, sqlite_url: str) -> None:
    real = federated(sqlite_url)
    fake = federated(sqlite_url, config=SYNTHETIC_CONFIG)
    fake_central = centralized(sqlite_url, config=SYNTHETIC_CONFIG)
    result = cli("runs", "list", "--db", sqlite_url)
    assert result.code == 0, result.err
    rows = table_rows(result.out)
    assert rows[str(real)][1] == "federated"
    assert rows[str(fake)][1] == "federated (synthetic)"
    assert rows[str(fake_central)][1] == "centralized (synthetic)"


@pytest.mark.parametrize(
    ("config", "title", "data"),
    [
        (SYNTHETIC_CONFIG, "run {id} (synthetic data)", "SYNTHETIC: generated toy"),
        # A config stored without the flag but with data.path: synthetic.
        ({"data": {"path": "synthetic"}}, "run {id} (synthetic data)", "SYNTHETIC"),
        (REAL_CONFIG, "run {id}", "/data/x.npz"),
    ],
    ids=["flag", "data-path", "real"],
)
def test_show_marks_synthetic_runs(
    config: dict[str, Any], title: str, data: str, cli: Any, sqlite_url: str
) -> None:
    run_id = federated(sqlite_url, config=config)
    result = cli("runs", "show", str(run_id), "--db", sqlite_url)
    assert result.code == 0, result.err
    assert result.out.splitlines()[0].strip() == title.format(id=run_id)
    assert table_rows(result.out)["data"][0].startswith(data)


def test_compare_marks_synthetic_runs(cli: Any, sqlite_url: str) -> None:
    real, fake = federated(sqlite_url), federated(sqlite_url, config=SYNTHETIC_CONFIG)
    result = cli("runs", "compare", str(real), str(fake), "--db", sqlite_url)
    assert result.code == 0, result.err
    assert table_rows(result.out)["mode"] == ["federated", "federated (synthetic)"]


def legend(url: str, run_ids: Sequence[int]) -> list[str]:
    """Return the legend labels of the figure ``runs plot`` draws for runs."""
    with session_scope(get_engine(url)) as db:
        reports = load_runs(db, run_ids)
    (fig_legend,) = make_figure(reports, {}).legends
    return [t.get_text() for t in fig_legend.get_texts()]


def test_plot_legend_marks_synthetic_runs(sqlite_url: str) -> None:
    real, fake = federated(sqlite_url), federated(sqlite_url, config=SYNTHETIC_CONFIG)
    labels = legend(sqlite_url, [real, fake])
    assert "(synthetic)" not in labels[0]
    assert labels[1].startswith(f"run {fake} fedavg dirichlet(alpha=0.5) (synthetic)")


@pytest.mark.parametrize("mode", ["federated", "centralized"])
def test_end_of_run_summary_marks_synthetic_data(
    mode: str, sqlite_url: str, tmp_path: Path
) -> None:
    console = Console(width=200, record=True, file=(tmp_path / "out").open("w"))
    for synthetic in (True, False):
        config = SYNTHETIC_CONFIG if synthetic else REAL_CONFIG
        if mode == "federated":
            run = SimpleNamespace(id=federated(sqlite_url, config=config))
            flower = SimpleNamespace(flwr_run_id="7", status="completed", details="")
            outcome = SimpleNamespace(run=run, flower=flower, url=sqlite_url)
            print_federated_summary(console, outcome)
        else:
            fit = SimpleNamespace(summary={"best_epoch": 1}, history=[{}])
            result = SimpleNamespace(
                run_id=1,
                fit=fit,
                save_dir=tmp_path,
                data=SimpleNamespace(synthetic=synthetic),
            )
            print_centralized_summary(console, result, sqlite_url)
        text = console.export_text()
        marked = "data:       SYNTHETIC (generated toy images, not X-rays)" in text
        assert marked is synthetic
        assert ("on synthetic data" in text) is synthetic


# 4: best is the best of its own metric ---------------------------------------


def test_compare_best_is_the_best_of_each_metric(cli: Any, sqlite_url: str) -> None:
    first = federated(sqlite_url)
    # All NaN/absent but AUROC: no best for them, not a crash.
    second = federated(sqlite_url, evals={1: {"auroc": 0.6}, 2: {"auroc": 0.5}})
    result = cli("runs", "compare", str(first), str(second), "--db", sqlite_url)
    assert result.code == 0, result.err
    rows = table_rows(result.out)
    assert rows["best-AUROC round / epoch"] == ["3", "1"]
    assert rows["best val AUROC"] == ["0.9000", "0.6000"]
    assert rows["best val loss"] == ["0.3000", "-"]  # lowest, from round 2
    assert rows["best val accuracy"] == ["0.8000", "-"]  # highest, from round 1
    assert rows["best train loss"] == ["0.2000", "0.2000"]  # lowest, round 2
    assert rows["final round / epoch"] == ["3", "2"]
    assert rows["final val loss"] == ["0.4000", "-"]


# 5: the legend tells runs apart ----------------------------------------------


def test_legend_shows_run_ids_and_only_the_config_keys_that_differ(
    sqlite_url: str,
) -> None:
    base = {"seed": 1, "train": {"lr": 0.001, "epochs": 1}, "outputs_dir": "/a"}
    other = {"seed": 1, "train": {"lr": 0.01, "epochs": 1}, "outputs_dir": "/b"}
    a = federated(sqlite_url, config=base)
    b = federated(sqlite_url, config=other)
    assert legend(sqlite_url, [a, b]) == [
        f"run {a} fedavg dirichlet(alpha=0.5): train.lr=0.001",
        f"run {b} fedavg dirichlet(alpha=0.5): train.lr=0.01",
    ]
    # One run alone: nothing to tell apart.
    assert legend(sqlite_url, [a]) == [f"run {a} fedavg dirichlet(alpha=0.5)"]


def test_legend_is_short_with_many_and_long_differences(sqlite_url: str) -> None:
    many = {f"k{i}": i for i in range(6)}
    a = federated(sqlite_url, config={**many, "data": {"path": "/long/" + "x" * 40}})
    b = federated(sqlite_url, config={"data": {"path": "/d/chest.npz"}})
    labels = legend(sqlite_url, [a, b])
    assert labels[0] == (
        f"run {a} fedavg dirichlet(alpha=0.5): data.path=xxxxxxxxxxxxxxx\u2026, "
        "k0=0, k1=1, +4 more"
    )
    assert labels[1] == (
        f"run {b} fedavg dirichlet(alpha=0.5): data.path=chest.npz, k0=-, k1=-, +4 more"
    )


# 6: centralized runs store their epochs done ---------------------------------


def test_centralized_run_stores_epochs_completed_as_they_complete(
    sqlite_url: str, tmp_path: Path
) -> None:
    with session_scope(get_engine(sqlite_url)) as db:
        experiment = repo.get_or_create_experiment(db, name="central").id
    collector = MetricsCollectorCallback(
        tmp_path / "out",
        experiment_id=experiment,
        database_url=sqlite_url,
        run_fields={"num_rounds": 3},
    )

    def stored() -> tuple[int, int | None, str, int]:
        with session_scope(get_engine(sqlite_url)) as db:
            run = db.get(Run, collector.run_id)
            (report,) = load_runs(db, [run.id])
            return run.rounds_completed, run.num_rounds, run.status, report.rounds_done

    collector.on_train_start()
    assert stored() == (0, 3, "in_progress", 0)
    collector.on_epoch_end(1, {"train_loss": 0.5, "val_auroc": 0.7})
    assert stored() == (1, 3, "in_progress", 1)
    collector.on_epoch_end(2, {"train_loss": 0.4, "val_auroc": 0.8})
    assert stored() == (2, 3, "in_progress", 2)
    collector.on_train_end({"best_epoch": 2})
    assert stored() == (2, 3, "completed", 2)


def test_failed_centralized_run_keeps_its_epochs_completed(
    sqlite_url: str, tmp_path: Path
) -> None:
    with session_scope(get_engine(sqlite_url)) as db:
        experiment = repo.get_or_create_experiment(db, name="central").id
    collector = MetricsCollectorCallback(
        tmp_path / "out", experiment_id=experiment, database_url=sqlite_url
    )
    collector.on_train_start()
    collector.on_epoch_end(1, {"train_loss": 0.5})
    collector.on_train_error(RuntimeError("diverged"))
    with session_scope(get_engine(sqlite_url)) as db:
        run = db.get(Run, collector.run_id)
        assert (run.status, run.rounds_completed) == ("failed", 1)


# 7: the ETA leaves the start-up out ------------------------------------------


class Clock:
    """Seconds that the test sets, in place of time.monotonic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("start", "marks", "etas"),
    [
        # Round 0 (the initial evaluation) ends after 100 s of start-up, then
        # each round takes 10 s: 5 rounds, so 40 s are left after round 1.
        (0, [(100, 0), (110, 1), (120, 2), (150, 5)], [None, 40, 30, 0]),
        # Centralized: epoch 1 carries data loading; epochs then take 20 s.
        (0, [(60, 1), (80, 2), (100, 3)], [None, 60, 40]),
        # Resumed at round 3: the first round after the resume has the start-up.
        (3, [(90, 4), (95, 5)], [None, 0]),
        # Uneven rounds: the mean pace since the first one (10 s and 20 s).
        (0, [(50, 0), (60, 1), (80, 2)], [None, 40, 45]),
    ],
    ids=["federated", "centralized", "resumed", "uneven"],
)
def test_eta_is_paced_from_the_first_completed_unit(
    start: int, marks: list[tuple[float, int]], etas: list[float | None]
) -> None:
    clock = Clock()
    total = 5
    estimator = EtaEstimator(total, clock=clock)
    seen = []
    for now, index in marks:
        clock.now = now
        estimator.mark(index)
        seen.append(estimator.eta())
    assert seen == etas


def test_eta_counts_down_between_units_and_never_below_zero() -> None:
    clock = Clock()
    estimator = EtaEstimator(4, clock=clock)
    for now, index in [(100.0, 0), (110.0, 1)]:
        clock.now = now
        estimator.mark(index)
    assert estimator.eta() == 30
    clock.now = 117.0
    assert estimator.eta() == 23
    clock.now = 500.0
    assert estimator.eta() == 0


def test_progress_line_shows_no_eta_until_it_can_be_estimated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="fedpneumo.progress")
    with ProgressReporter("round", 5, clock=clock) as reporter:
        for now, index in [(100.0, 0), (110.0, 1), (120.0, 2)]:
            clock.now = now
            reporter.advance(index, {"auroc": 0.5})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "round 0/5 auroc=0.5000 elapsed=100s",
        "round 1/5 auroc=0.5000 elapsed=110s eta=40s",
        "round 2/5 auroc=0.5000 elapsed=120s eta=30s",
    ]
    assert not re.search(r"eta=\d{3,}", " ".join(lines))  # old: 100 s x 5 rounds
