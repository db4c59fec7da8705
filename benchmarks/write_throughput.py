"""Benchmark 3: metric rows per second, fedpneumo's collector against MLflow.

Two batch shapes, each one transaction per batch:
- epoch: 1000 metrics per batch (MLflow's log_batch limit), centralized rows;
- client-round: 10 metrics per batch, one client's epoch in a round.

fedpneumo writes through ``MetricsCollectorCallback.on_epoch_end`` (each batch
is first written and fsynced to the run's spool file, then inserted); MLflow
through ``SqlAlchemyStore.log_batch``, the call its client's ``log_batch`` ends
in. Both write into one PostgreSQL 15 server with its default, durable settings
(fsync, synchronous commit, full page writes on), each into a database of its
own, and into SQLite files in one directory, each with its own defaults; the
two sides alternate. The fsync-off figures (a throwaway server tuned for
tests) are ours alone, for comparison with earlier runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import save_result, summarize, target

# Rows are generated: `python -m benchmarks all --data ...` passes it none.
TAKES_DATA = False
SHAPES = {"epoch": 1000, "client_round": 10}


def _run(url: str, mode: str) -> int:
    from persistence import repositories as repo
    from persistence.db import get_engine, session_scope, upgrade_database

    upgrade_database(url)
    with session_scope(get_engine(url)) as s:
        exp = repo.get_or_create_experiment(s, name="bench-throughput")
        return repo.create_run(s, experiment_id=exp.id, training_mode=mode).id


def ours(url: str, save_dir: Path, batches: int, per_batch: int) -> float:
    """Rows/s through the collector, ``per_batch`` metrics per epoch."""
    from client_app.metrics_collector import MetricsCollectorCallback

    federated = per_batch < 1000
    run_id = _run(url, "federated" if federated else "centralized")
    client = {"client_identifier": "client-0", "partition_id": 0} if federated else {}
    collector = MetricsCollectorCallback(
        save_dir,
        run_id=run_id,
        training_mode="federated" if federated else "centralized",
        database_url=url,
        flush_timeout_s=0,
        round_number=1 if federated else None,
        **client,
    )
    metrics = {f"train_m{i}": float(i) for i in range(per_batch)}
    collector._write_files = lambda *a: None  # the database path only
    started = time.perf_counter()
    for epoch in range(1, batches + 1):
        collector.on_epoch_end(epoch, metrics)
    elapsed = time.perf_counter() - started
    assert not collector.writer.pending()
    return batches * per_batch / elapsed


def mlflow_store(url: str, artifacts: Path) -> tuple[object, str]:
    """An MLflow SqlAlchemyStore on a fresh database, and a run in it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(url, str(artifacts))  # creates MLflow's schema
    experiment = store.create_experiment("bench-throughput")
    run = store.create_run(
        experiment, user_id="bench", start_time=0, tags=[], run_name="bench"
    )
    return store, run.info.run_id


def theirs(store: object, run_id: str, batches: int, per_batch: int) -> float:
    """Rows/s through MLflow's log_batch, ``per_batch`` metrics per call."""
    from mlflow.entities import Metric

    names = [f"train_m{i}" for i in range(per_batch)]
    started = time.perf_counter()
    for step in range(1, batches + 1):
        stamp = int(time.time() * 1000)
        metrics = [Metric(n, float(i), stamp, step) for i, n in enumerate(names)]
        store.log_batch(run_id, metrics=metrics, params=[], tags=[])  # type: ignore[attr-defined]
    return batches * per_batch / (time.perf_counter() - started)


def compare(
    backend: str, new_url: callable, tmp: Path, rows: dict[str, int], repeats: int
) -> dict:
    """Alternate fedpneumo and MLflow on one backend; return rows/s and ratios."""
    figures: dict = {}
    for shape, per_batch in SHAPES.items():
        batches = max(rows[shape] // per_batch, 1)
        rates: dict[str, list[float]] = {"fedpneumo": [], "mlflow": []}
        for repeat in range(repeats):
            name = f"{backend}_{shape}_{repeat}"
            store, run_id = mlflow_store(new_url(f"mlflow_{name}"), tmp / name)
            ours_url = new_url(f"ours_{name}")
            sides = (
                ("fedpneumo", "mlflow") if repeat % 2 == 0 else ("mlflow", "fedpneumo")
            )
            for side in sides:
                if side == "fedpneumo":
                    rate = ours(ours_url, tmp / f"spool_{name}", batches, per_batch)
                else:
                    rate = theirs(store, run_id, batches, per_batch)
                rates[side].append(rate)
            store.engine.dispose()  # type: ignore[attr-defined]
        ratios = [
            a / b for a, b in zip(rates["fedpneumo"], rates["mlflow"], strict=True)
        ]
        figures[shape] = {
            "fedpneumo_rows_per_s": summarize(rates["fedpneumo"]),
            "mlflow_rows_per_s": summarize(rates["mlflow"]),
            "ratio_fedpneumo_mlflow": summarize(ratios),
        }
    return figures


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark on SQLite and throwaway PostgreSQL servers."""
    from tests.pg_server import ThrowawayPostgres

    parser = argparse.ArgumentParser(prog="python -m benchmarks write_throughput")
    parser.add_argument("--epoch-rows", type=int, default=50_000)
    parser.add_argument("--client-round-rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = {"epoch": args.epoch_rows, "client_round": args.client_round_rows}
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with ThrowawayPostgres(durable=True) as pg:
            figures["postgresql_durable"] = compare(
                "pg", pg.create_database, folder, rows, args.repeats
            )
        figures["sqlite"] = compare(
            "sqlite",
            lambda name: f"sqlite:///{folder / name}.db",
            folder,
            rows,
            args.repeats,
        )
        with ThrowawayPostgres() as fast:
            figures["postgresql_fsync_off_fedpneumo_only"] = {
                shape: summarize(
                    [
                        ours(
                            fast.create_database(f"off_{shape}_{i}"),
                            folder / f"off_{shape}_{i}",
                            max(rows[shape] // size, 1),
                            size,
                        )
                        for i in range(args.repeats)
                    ]
                )
                for shape, size in SHAPES.items()
            }
    figures["config"] = (
        f"{args.epoch_rows:,} rows in 1000-metric batches and "
        f"{args.client_round_rows:,} rows in 10-metric batches per measurement, "
        f"{args.repeats} alternating repeats; PostgreSQL 15 on loopback with its "
        "default durable settings; SQLite: fedpneumo in WAL mode with "
        "synchronous=NORMAL plus an fsynced spool file per batch, MLflow with "
        "SQLite's defaults (rollback journal, synchronous=FULL)"
    )
    durable = figures["postgresql_durable"]
    save_result(
        "write_throughput",
        figures,
        [
            target(
                "fedpneumo / MLflow rows/s, 1000-metric batches, PostgreSQL durable",
                durable["epoch"]["ratio_fedpneumo_mlflow"]["median"],
                ">=",
                1.0,
            )
        ],
        notes="Measured, not chosen: both sides are bound by commit latency on "
        "small batches. fedpneumo's batches also survive a database outage: each "
        "is fsynced to a spool file before the insert (that second fsync is in "
        "its figures), and replayed later if the insert fails. MLflow's "
        "log_batch takes at most 1000 metrics per call. The fsync-off rows are "
        "fedpneumo alone on a server tuned for tests, not a durable setting.",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
