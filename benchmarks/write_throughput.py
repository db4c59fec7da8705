"""Benchmark 3: metric rows per second through the collector's batched path.

The batched path is ``MetricsCollectorCallback.on_epoch_end``: one spool file
and one transaction per epoch. It is compared with one row per transaction.
Target: >= 50,000 rows/s into PostgreSQL.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import save_result, summarize, target

# Rows are generated: `python -m benchmarks all --data ...` passes it none.
TAKES_DATA = False


def _run(url: str) -> int:
    from persistence import repositories as repo
    from persistence.db import get_engine, session_scope, upgrade_database

    upgrade_database(url)
    with session_scope(get_engine(url)) as s:
        exp = repo.get_or_create_experiment(s, name="bench-throughput")
        return repo.create_run(s, experiment_id=exp.id, training_mode="centralized").id


def batched(url: str, save_dir: Path, epochs: int, per_epoch: int) -> float:
    """Rows/s writing ``per_epoch`` metrics per epoch through the collector."""
    from client_app.metrics_collector import MetricsCollectorCallback

    run_id = _run(url)
    collector = MetricsCollectorCallback(
        save_dir, run_id=run_id, database_url=url, flush_timeout_s=0
    )
    metrics = {f"train_m{i}": float(i) for i in range(per_epoch)}
    collector._write_files = lambda *a: None  # measure the database path only
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        collector.on_epoch_end(epoch, metrics)
    elapsed = time.perf_counter() - started
    assert not collector.writer.pending()
    return epochs * per_epoch / elapsed


def row_at_a_time(url: str, rows: int) -> float:
    """Rows/s writing one row per transaction through the repository."""
    from persistence import repositories as repo
    from persistence.db import get_engine, session_scope

    run_id = _run(url)
    engine = get_engine(url)
    started = time.perf_counter()
    for step in range(rows):
        with session_scope(engine) as s:
            repo.add_metrics(
                s,
                run_id=run_id,
                client_id=None,
                points=[repo.MetricPoint("train_loss", 0.5, step, "train")],
            )
    return rows / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark on SQLite and a throwaway PostgreSQL server."""
    from tests.pg_server import ThrowawayPostgres

    parser = argparse.ArgumentParser(prog="python -m benchmarks write_throughput")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-sizes", default="1000,5000")
    parser.add_argument("--single-rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp, ThrowawayPostgres() as pg:
        for backend in ("sqlite", "postgresql"):
            rates: dict[int, list[float]] = {size: [] for size in sizes}
            slow = []
            for i in range(args.repeats):
                for size in sizes:
                    name = f"{backend}{i}b{size}"
                    url = (
                        f"sqlite:///{tmp}/{name}.db"
                        if backend == "sqlite"
                        else pg.create_database(name)
                    )
                    epochs = max(args.rows // size, 1)
                    rates[size].append(batched(url, Path(tmp) / name, epochs, size))
                url = (
                    f"sqlite:///{tmp}/single{i}.db"
                    if backend == "sqlite"
                    else pg.create_database(f"single{i}")
                )
                slow.append(row_at_a_time(url, args.single_rows))
            figures[backend] = {
                **{
                    f"batched_{size}_per_epoch_rows_per_s": summarize(rates[size])
                    for size in sizes
                },
                "row_per_transaction_rows_per_s": summarize(slow),
            }
    figures["config"] = (
        f"{args.rows:,} rows per measurement through on_epoch_end with "
        f"{' or '.join(map(str, sizes))} metrics per epoch (batched), and "
        f"{args.single_rows} single-row transactions; PostgreSQL 15 on loopback "
        "with fsync off (a throwaway test server), SQLite in WAL mode"
    )
    pg_rate = figures["postgresql"][f"batched_{sizes[-1]}_per_epoch_rows_per_s"][
        "median"
    ]
    save_result(
        "write_throughput",
        figures,
        [
            target(
                f"batched rows/s into PostgreSQL ({sizes[-1]} metrics per epoch)",
                pg_rate,
                ">=",
                50_000,
                "rows/s",
            )
        ],
        notes="The batched path includes the durable spool: each epoch's batch "
        "is written and fsynced to a local file before the database insert.",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
