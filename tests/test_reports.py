"""`fedpneumo runs ...` on real runs: list, show, compare, plot, export.

One real centralized and one real federated run are made once per module on
SQLite; the PostgreSQL variant holds a copy of the very same rows.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from fedpneumo.runs_cli import fmt_duration
from fedpneumo.summary import fmt
from persistence import repositories as repo
from persistence.db import dispose_engines, get_engine, session_scope, upgrade_database
from persistence.models import (
    Base,
    Client,
    ClientEvaluation,
    ClientFailure,
    PrivacySpent,
    Run,
    RunMetric,
    ServerEvaluation,
    TestEvaluation,
)
from tests.conftest import run_cli
from tests.dashboard import dashboard, save_screenshot

EXPORTED = {
    "runs": Run,
    "clients": Client,
    "server_evaluations": ServerEvaluation,
    "run_metrics": RunMetric,
    "client_failures": ClientFailure,
    "client_evaluations": ClientEvaluation,
    "test_evaluations": TestEvaluation,
    "privacy_spent": PrivacySpent,
}


@dataclass(frozen=True)
class Tracked:
    """A database holding one real centralized and one real federated run."""

    url: str
    central: int
    federated: int


@pytest.fixture(scope="module")
def real_runs_url(
    tmp_path_factory: pytest.TempPathFactory, data_file: Path
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("reports")
    url = f"sqlite:///{tmp / 'tracking.db'}"
    env = {"DATABASE_URL": url, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    common = (f"data.path={data_file}", "model.width=8", f"outputs_dir={tmp / 'out'}")
    train = run_cli(
        "train",
        *common,
        "data.limit=300",
        "train.epochs=2",
        "experiment_name=baseline",
        env=env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    federated = run_cli(
        "run",
        *common,
        "data.limit=200",
        "simulation.num_supernodes=2",
        "num_rounds=2",
        "experiment_name=federated",
        env=env,
    )
    assert federated.returncode == 0, federated.stderr[-3000:]
    yield url
    dispose_engines()


def copy_rows(source: str, target: str) -> None:
    """Copy every row of a tracking database into a migrated one."""
    upgrade_database(target)
    with get_engine(source).connect() as src, get_engine(target).begin() as dst:
        for table in Base.metadata.sorted_tables:
            rows = [dict(r) for r in src.execute(select(table)).mappings()]
            if rows:
                dst.execute(table.insert(), rows)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def tracked(request: pytest.FixtureRequest, real_runs_url: str) -> Tracked:
    url = real_runs_url
    if request.param == "postgres":
        url = request.getfixturevalue("pg_server").create_database()
        copy_rows(real_runs_url, url)
    with session_scope(get_engine(url)) as s:
        ids = dict(s.execute(select(Run.training_mode, Run.id)).all())
    return Tracked(url, ids["centralized"], ids["federated"])


def snapshot(url: str) -> tuple[Any, ...]:
    """Return what any write would change: row counts, run rows, the file."""
    with session_scope(get_engine(url)) as s:
        counts = [
            s.scalar(select(func.count()).select_from(t))
            for t in Base.metadata.sorted_tables
        ]
        runs = s.execute(select(Run.id, Run.status, Run.heartbeat_at)).all()
    file_state = None
    if url.startswith("sqlite"):
        stat = Path(make_url(url).database or "").stat()
        file_state = (stat.st_mtime_ns, stat.st_size)
    return counts, runs, file_state


def runs_cmd(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `fedpneumo runs ARGS --db URL` and check the database is untouched."""
    before = snapshot(url)
    result = run_cli("runs", *args, "--db", url, timeout=120)
    assert snapshot(url) == before, "a read-only command changed the database"
    return result


def table_rows(text: str) -> list[list[str]]:
    """Return the body rows of the rich tables in a command's output."""
    return [
        [cell.strip() for cell in re.split(r"[│|]", line)[1:-1]]
        for line in text.splitlines()
        if line.startswith(("│", "|"))
    ]


def epoch_metric(s: Session, run_id: int, name: str) -> dict[int, float | None]:
    """Return a centralized run's metric by epoch, straight from run_metrics."""
    rows = s.execute(
        select(RunMetric.step, RunMetric.metric_value).where(
            RunMetric.run_id == run_id,
            RunMetric.client_id.is_(None),
            RunMetric.round_number.is_(None),
            RunMetric.metric_name == name,
        )
    )
    return dict(sorted(rows.all()))


def server_evals(s: Session, run_id: int) -> list[ServerEvaluation]:
    stmt = select(ServerEvaluation).where(ServerEvaluation.run_id == run_id)
    return list(s.scalars(stmt.order_by(ServerEvaluation.round_number)))


def argmax(values: dict[int, float | None]) -> int:
    """Return the first key with the highest value."""
    return max((k for k, v in values.items() if v is not None), key=lambda k: values[k])


@pytest.mark.e2e
def test_list_shows_status_progress_and_best_val_auroc(tracked: Tracked) -> None:
    result = runs_cmd(tracked.url, "list")
    assert result.returncode == 0, result.stderr
    rows = {row[0]: row for row in table_rows(result.stdout)}
    assert set(rows) == {str(tracked.central), str(tracked.federated)}
    with session_scope(get_engine(tracked.url)) as s:
        central = s.get(Run, tracked.central)
        federated = s.get(Run, tracked.federated)
        auroc = epoch_metric(s, central.id, "val_auroc")
        accuracy = epoch_metric(s, central.id, "val_accuracy")
        epochs = len(epoch_metric(s, central.id, "train_loss"))
        best = argmax(auroc)
        assert rows[str(central.id)][1:] == [
            "baseline",
            "centralized",
            "-",
            "-",
            "completed",
            f"{epochs}/{central.num_rounds}",
            fmt(auroc[best]),
            fmt(accuracy[best]),
            f"epoch {best}",
            "-",  # not a private run: no epsilon
            fmt_duration((central.end_time - central.start_time).total_seconds()),
        ]
        evals = server_evals(s, federated.id)
        top = max(evals, key=lambda e: e.auroc)
        assert rows[str(federated.id)][1:] == [
            "federated",
            "federated",
            "fedavg",
            "dirichlet(alpha=0.5)",
            "completed",
            "2/2",
            fmt(top.auroc),
            fmt(top.accuracy),
            f"round {top.round_number}",
            "-",
            fmt_duration((federated.end_time - federated.start_time).total_seconds()),
        ]
    only = runs_cmd(tracked.url, "list", "--experiment", "baseline")
    assert [r[0] for r in table_rows(only.stdout)] == [str(tracked.central)]


@pytest.mark.e2e
def test_show_federated_run(tracked: Tracked) -> None:
    result = runs_cmd(tracked.url, "show", str(tracked.federated))
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    with session_scope(get_engine(tracked.url)) as s:
        run = s.get(Run, tracked.federated)
        assert '"limit": 200' in result.stdout  # the config, pretty printed
        assert ["partition", run.partition] in rows
        train_loss = dict(
            s.execute(
                select(RunMetric.round_number, RunMetric.metric_value).where(
                    RunMetric.run_id == run.id,
                    RunMetric.client_id.is_(None),
                    RunMetric.metric_name == "train_loss",
                )
            ).all()
        )
        evals = server_evals(s, run.id)
        best = max(evals, key=lambda e: e.auroc)
        expected = [
            [
                str(e.round_number),
                fmt(train_loss.get(e.round_number)),
                *(fmt(e.loss), fmt(e.accuracy), fmt(e.auroc), fmt(e.f1_score)),
                *(fmt(e.precision), fmt(e.recall)),
                "*" if e is best else "",
            ]
            for e in evals
        ]
        assert [r for r in rows if len(r) == 9] == expected
        clients = s.scalars(
            select(Client).where(Client.run_id == run.id).order_by(Client.partition_id)
        ).all()
        assert len(clients) == 2
        for c in clients:
            losses = s.execute(
                select(RunMetric.round_number, RunMetric.metric_value)
                .where(
                    RunMetric.client_id == c.id, RunMetric.metric_name == "train_loss"
                )
                .order_by(RunMetric.round_number, RunMetric.step)
            ).all()
            last = losses[-1].round_number
            auroc = s.scalars(
                select(RunMetric.metric_value)
                .where(
                    RunMetric.client_id == c.id,
                    RunMetric.round_number == last,
                    RunMetric.metric_name == "val_auroc",
                )
                .order_by(RunMetric.step.desc())
            ).first()
            assert [
                c.client_identifier,
                fmt(c.partition_id),
                fmt(c.num_examples),
                str(len({r.round_number for r in losses})),
                str(last),
                fmt(losses[-1].metric_value),
                "nan" if auroc is None else fmt(auroc),
                "0",
            ] in rows
        scores = hospital_scores(s, run.id)
    assert "client failures: 0" in result.stdout
    # Each hospital's score of the best and of the last round's model, with
    # the worst hospital named; client-0's slice holds normals only.
    shown_rounds = list(dict.fromkeys([best.round_number, evals[-1].round_number]))
    expected_hospitals = []
    for rnd in shown_rounds:
        for name, ev in scores[rnd]:
            tn, fp = ev.true_negatives, ev.false_positives
            tp, fn = ev.true_positives, ev.false_negatives
            # Undefined rates (no positives, or no negatives) are '-', not 0.
            expected_hospitals.append(
                [
                    name,
                    fmt(ev.num_samples),
                    "n/a (one class)" if ev.auroc is None else fmt(ev.auroc),
                    fmt(ev.accuracy),
                    fmt(ev.f1_score),
                    fmt(tp / (tp + fn)) if tp + fn else "-",
                    fmt(tn / (tn + fp)) if tn + fp else "-",
                ]
            )
        (scored,) = [(n, e) for n, e in scores[rnd] if e.auroc is not None]
        assert (
            f"worst hospital (round {rnd}): {scored[0]} AUROC {fmt(scored[1].auroc)}; "
            "spread (best - worst) 0.0000 over 1 hospital with an AUROC; no AUROC "
            "for client-0 (a one-class slice: undefined, not 0)"
        ) in result.stdout
    assert [r for r in rows if len(r) == 7] == expected_hospitals
    assert [r[2] for r in expected_hospitals if r[0] == "client-0"] == [
        "n/a (one class)"
    ] * len(shown_rounds)
    assert "nothing is claimed about test" in result.stdout


def hospital_scores(
    s: Session, run_id: int
) -> dict[int, list[tuple[str, ClientEvaluation]]]:
    """Return a run's client_evaluations rows by round, in hospital order."""
    rows = s.execute(
        select(Client.client_identifier, ClientEvaluation)
        .join(Client, ClientEvaluation.client_id == Client.id)
        .where(ClientEvaluation.run_id == run_id)
        .order_by(ClientEvaluation.round_number, Client.partition_id)
    ).all()
    by_round: dict[int, list[tuple[str, ClientEvaluation]]] = {}
    for name, ev in rows:
        by_round.setdefault(ev.round_number, []).append((name, ev))
    return by_round


@pytest.mark.e2e
def test_show_centralized_run(tracked: Tracked) -> None:
    result = runs_cmd(tracked.url, "show", str(tracked.central))
    assert result.returncode == 0, result.stderr
    assert "validation per epoch" in result.stdout and '"limit": 300' in result.stdout
    assert "clients" not in result.stdout
    with session_scope(get_engine(tracked.url)) as s:
        names = ("train_loss", "val_loss", "val_accuracy", "val_auroc", "val_f1_score")
        names += ("val_precision", "val_recall")
        series = {n: epoch_metric(s, tracked.central, n) for n in names}
    best = argmax(series["val_auroc"])
    expected = [
        [str(epoch), *(fmt(series[n][epoch]) for n in names), "*" * (epoch == best)]
        for epoch in series["train_loss"]
    ]
    assert [r for r in table_rows(result.stdout) if len(r) == 9] == expected


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.e2e
def test_compare_best_final_and_config_differences(tracked: Tracked) -> None:
    ids = (tracked.central, tracked.federated)
    result = runs_cmd(tracked.url, "compare", *map(str, ids))
    assert result.returncode == 0, result.stderr
    metrics_part, config_part = result.stdout.split("config differences")
    metrics = {r[0]: r[1:] for r in table_rows(metrics_part)}
    with session_scope(get_engine(tracked.url)) as s:
        auroc = epoch_metric(s, tracked.central, "val_auroc")
        accuracy = epoch_metric(s, tracked.central, "val_accuracy")
        loss = epoch_metric(s, tracked.central, "val_loss")
        evals = server_evals(s, tracked.federated)
        top = max(evals, key=lambda e: e.auroc)
        configs = [flat(s.get(Run, i).config) for i in ids]
    best, last = argmax(auroc), max(auroc)
    assert metrics["mode"] == ["centralized", "federated"]
    assert metrics["best-AUROC round / epoch"] == [str(best), str(top.round_number)]
    assert metrics["best val AUROC"] == [fmt(auroc[best]), fmt(top.auroc)]
    # Every other best row is the best of its own metric, not its value at
    # the best-AUROC round: the highest accuracy, the lowest loss.
    assert metrics["best val accuracy"] == [
        fmt(max(v for v in accuracy.values() if v is not None)),
        fmt(max(e.accuracy for e in evals if e.accuracy is not None)),
    ]
    assert metrics["best val loss"] == [
        fmt(min(v for v in loss.values() if v is not None)),
        fmt(min(e.loss for e in evals if e.loss is not None)),
    ]
    assert metrics["final round / epoch"] == [str(last), str(evals[-1].round_number)]
    assert metrics["final val AUROC"] == [fmt(auroc[last]), fmt(evals[-1].auroc)]
    assert metrics["final val accuracy"] == [
        fmt(accuracy[last]),
        fmt(evals[-1].accuracy),
    ]
    differing = {k for k in configs[0] if configs[0][k] != configs[1].get(k)}
    shown = {r[0]: r[1:] for r in table_rows(config_part)}
    assert set(shown) == differing and {"data.limit", "train.epochs"} <= differing
    assert shown["data.limit"] == ["300", "200"]
    assert "seed" not in shown and "model.width" not in shown


@pytest.mark.e2e
def test_plot_writes_a_fixed_size_png(tracked: Tracked, tmp_path: Path) -> None:
    both = tmp_path / "both.png"
    result = runs_cmd(
        tracked.url,
        "plot",
        str(tracked.federated),
        str(tracked.central),
        "-o",
        str(both),
    )
    assert result.returncode == 0, result.stderr
    assert mpimg.imread(both).shape == (1100, 1200, 4)
    single = tmp_path / "single.png"
    result = runs_cmd(tracked.url, "plot", str(tracked.federated), "-o", str(single))
    assert result.returncode == 0, result.stderr
    assert mpimg.imread(single).shape == (1100, 1200, 4)


def db_rows(url: str, run_id: int) -> dict[str, list[Base]]:
    with session_scope(get_engine(url)) as s:
        tables: dict[str, list[Base]] = {"runs": [s.get(Run, run_id)]}
        for name, model in list(EXPORTED.items())[1:]:
            stmt = select(model).where(model.run_id == run_id).order_by(model.id)
            tables[name] = list(s.scalars(stmt))
        return tables


def columns(row: Base) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


@pytest.mark.e2e
def test_export_json_round_trips(tracked: Tracked, tmp_path: Path) -> None:
    for run_id in (tracked.central, tracked.federated):
        out = tmp_path / f"run{run_id}.json"
        result = runs_cmd(
            tracked.url, "export", str(run_id), "-f", "json", "-o", str(out)
        )
        assert result.returncode == 0, result.stderr
        doc = json.loads(out.read_text())
        expected = db_rows(tracked.url, run_id)
        exported = {
            "runs": [doc["run"]],
            "clients": doc["clients"],
            "server_evaluations": doc["server_evaluations"],
            "run_metrics": doc["metrics"],
            "client_failures": doc["client_failures"],
            "client_evaluations": doc["client_evaluations"],
            "test_evaluations": doc["test_evaluations"],
            "privacy_spent": doc["privacy_spent"],
        }
        assert expected["run_metrics"] and expected["runs"][0].config
        for table, rows in expected.items():
            assert len(exported[table]) == len(rows), table
            for row, got in zip(rows, exported[table], strict=True):
                for key, value in columns(row).items():
                    if isinstance(value, datetime):
                        assert datetime.fromisoformat(got[key]) == value
                    else:
                        assert got[key] == value, (table, key)


def parse_cell(cell: str, like: Any) -> Any:
    """Read a CSV cell back as the type of the database value."""
    if like is None or cell == "":
        return None if cell == "" else cell
    if isinstance(like, bool):
        return {"true": True, "false": False}[cell]
    if isinstance(like, datetime):
        return datetime.fromisoformat(cell)
    if isinstance(like, dict):
        return json.loads(cell)
    return type(like)(cell)


@pytest.mark.e2e
def test_export_csv_round_trips(tracked: Tracked, tmp_path: Path) -> None:
    for run_id in (tracked.central, tracked.federated):
        out = tmp_path / f"run{run_id}.csv"
        result = runs_cmd(
            tracked.url, "export", str(run_id), "-f", "csv", "-o", str(out)
        )
        assert result.returncode == 0, result.stderr
        with out.open(newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames and reader.fieldnames[0] == "table"
            read = list(reader)
        expected = db_rows(tracked.url, run_id)
        assert [r["table"] for r in read] == [
            name for name, rows in expected.items() for _ in rows
        ]
        db_flat = [row for rows in expected.values() for row in rows]
        for row, got in zip(db_flat, read, strict=True):
            values = columns(row)
            for key, cell in got.items():
                if key == "table":
                    continue
                if key not in values:
                    assert cell == "", key
                else:
                    assert parse_cell(cell, values[key]) == values[key], key


@pytest.mark.parametrize(
    "args",
    [
        ("show", "999"),
        ("compare", "{central}", "999"),
        ("plot", "999", "-o", "{tmp}/x.png"),
        ("export", "999", "-f", "csv", "-o", "{tmp}/x.csv"),
    ],
    ids=["show", "compare", "plot", "export"],
)
@pytest.mark.e2e
def test_missing_run_is_one_clear_line(
    tracked: Tracked, tmp_path: Path, args: tuple[str, ...]
) -> None:
    args = tuple(a.format(central=tracked.central, tmp=tmp_path) for a in args)
    result = runs_cmd(tracked.url, *args)
    assert result.returncode == 2  # a bad argument (README's exit codes)
    assert result.stderr.strip() == "error: run 999 does not exist"
    assert list(tmp_path.iterdir()) == []


def test_missing_database_file_is_an_error_not_a_new_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tracking.db"
    for how in (["--db", f"sqlite:///{missing}"], []):
        result = run_cli(
            "runs", "list", *how, env={"DATABASE_URL": f"sqlite:///{missing}"}
        )
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert str(missing) in lines[0] and "does not exist" in lines[0]
        assert not missing.parent.exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_dead_in_progress_run_is_stale_and_failures_show(db_url: str) -> None:
    with session_scope(get_engine(db_url)) as s:
        exp = repo.get_or_create_experiment(s, name="crashy")
        dead = repo.create_run(
            s, experiment_id=exp.id, training_mode="federated", num_rounds=3
        )
        repo.update_run(s, run_id=dead.id, pid=dead_pid())
        repo.get_or_create_client(
            s, run_id=dead.id, client_identifier="client-0", node_id=7, num_examples=5
        )
        repo.add_client_failure(
            s,
            run_id=dead.id,
            round_number=1,
            node_id=7,
            reason="OOM",
            client_identifier="client-0",
        )
        alive = repo.create_run(s, experiment_id=exp.id, training_mode="federated")
        ids = (dead.id, alive.id)
    result = run_cli("runs", "list", env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    rows = {r[0]: r for r in table_rows(result.stdout)}
    assert rows[str(ids[0])][5:7] == ["stale", "0/3"]
    assert rows[str(ids[1])][5] == "in_progress"  # this test process is alive
    shown = run_cli("runs", "show", str(ids[0]), env={"DATABASE_URL": db_url})
    assert shown.returncode == 0, shown.stderr
    rows = table_rows(shown.stdout)
    assert ["status", "stale"] in rows and "client failures: 1" in shown.stdout
    assert ["client-0", "-", "5", "0", "-", "-", "-", "1"] in rows
    assert ["1", "client-0", "7", "OOM"] in rows


# The dashboard (`fedpneumo ui`), in a real browser --------------------------


def hospitals_of(url: str, run_id: int) -> list[str]:
    with session_scope(get_engine(url)) as s:
        return s.scalars(
            select(Client.client_identifier)
            .join(ClientEvaluation, ClientEvaluation.client_id == Client.id)
            .where(ClientEvaluation.run_id == run_id)
            .distinct()
        ).all()


@pytest.mark.e2e
def test_dashboard_shows_what_the_database_holds(
    tracked: Tracked, browser: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backend = "postgres" if tracked.url.startswith("postgresql") else "sqlite"
    with session_scope(get_engine(tracked.url)) as s:
        statuses = dict(s.execute(select(Run.id, Run.status)).all())
        best = max(e.auroc for e in server_evals(s, tracked.federated))
        configs = [s.get(Run, i).config for i in (tracked.central, tracked.federated)]
    first, second, absent = flat(configs[0]), flat(configs[1]), object()
    keys = first.keys() | second.keys()
    differing = {k for k in keys if first.get(k, absent) != second.get(k, absent)}
    before = snapshot(tracked.url)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    with dashboard(tracked.url) as (address, proc):
        # Runs: both, with their ids and statuses.
        page.goto(address + "/")
        rows = page.locator("#runs tbody tr")
        assert rows.count() == 2
        for run_id, status in statuses.items():
            row = page.locator(f"#runs tr[data-run='{run_id}']")
            assert row.locator("td.status").inner_text() == status
            assert row.locator("td a").first.inner_text() == str(run_id)
        save_screenshot(page, tmp_path / f"dashboard-runs-{backend}.png")

        # The federated run: its best val AUROC, one heatmap row per hospital.
        page.goto(f"{address}/runs/{tracked.federated}")
        page.wait_for_function("document.getElementById('heatmap').data")
        assert page.locator("#best-auroc").inner_text() == fmt(best)
        heatmap = page.evaluate("document.getElementById('heatmap').data[0]")
        hospitals = hospitals_of(tracked.url, tracked.federated)
        assert sorted(heatmap["y"]) == sorted(hospitals) and len(hospitals) == 2
        assert len(heatmap["z"]) == len(hospitals)
        assert (
            page.locator("#test-score")
            .inner_text()
            .startswith("the data has no test split")
        )
        shot = save_screenshot(page, tmp_path / f"dashboard-run-{backend}.png")
        assert mpimg.imread(shot).shape[1] == 1280

        # Compare: only the config keys that differ.
        page.goto(f"{address}/compare?run={tracked.central}&run={tracked.federated}")
        keys = page.locator("#differences td.key").all_inner_texts()
        assert set(keys) == differing and {"data.limit", "train.epochs"} <= set(keys)
        save_screenshot(page, tmp_path / f"dashboard-compare-{backend}.png")

        # An unknown run is a 404 page naming the id.
        response = page.goto(f"{address}/runs/987654")
        assert response is not None and response.status == 404
        assert "run 987654 does not exist" in page.locator("#error").inner_text()
        proc_alive = proc.poll() is None
    page.close()
    assert proc_alive
    assert snapshot(tracked.url) == before  # read-only throughout
