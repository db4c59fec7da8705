"""Benchmark 4: 10, 100 and 1000 simulated clients, 10 sampled per round.

Reports seconds per round, the peak memory of the whole process tree (our
process, the SuperLink, Flower's simulation and Ray's workers) and the peak
number of PostgreSQL connections. Target: flat round time and bounded
connections at 1000 clients on 2 cores / 24 GiB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
from pathlib import Path

from benchmarks.common import federated_session, round_seconds, save_result, target


def tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants."""
    from fedpneumo.flower import descendants

    total = 0
    for pid in [root, *descendants(root)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Monitor(threading.Thread):
    """Sample peak memory and database connections while a run goes on."""

    def __init__(self, pg: object) -> None:
        super().__init__(daemon=True)
        self.pg = pg
        self.peak_rss = 0
        self.peak_connections = 0
        self.stop = threading.Event()

    def run(self) -> None:
        """Sample every half second until stopped."""
        while not self.stop.wait(0.5):
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(os.getpid()))
            self.peak_connections = max(
                self.peak_connections, self.pg.connection_count()
            )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and save its figures."""
    from tests.pg_server import ThrowawayPostgres

    parser = argparse.ArgumentParser(prog="python -m benchmarks scale")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as out, ThrowawayPostgres() as pg:
        for n in [int(c) for c in args.clients.split(",")]:
            url = pg.create_database(f"scale{n}")
            monitor = Monitor(pg)
            monitor.start()
            outcome = federated_session(
                [
                    f"data.path={args.data}",
                    f"num_rounds={args.rounds}",
                    f"simulation.num_supernodes={n}",
                    f"strategy.fraction_train={args.sampled / n}",
                    "partition=iid",
                    "partition.min_partition_size=1",
                    f"outputs_dir={out}",
                    "experiment_name=bench-scale",
                ],
                env={"DATABASE_URL": url},
            )
            monitor.stop.set()
            monitor.join()
            rounds = round_seconds(outcome.round_times)
            figures[str(n)] = {
                "round_seconds_median": statistics.median(rounds),
                "round_seconds_min": min(rounds),
                "round_seconds_max": max(rounds),
                "startup_seconds": outcome.round_times[0],
                "peak_rss_gib": monitor.peak_rss / 2**30,
                "peak_db_connections": monitor.peak_connections,
            }
    counts = sorted(figures, key=int)
    flatness = (
        figures[counts[-1]]["round_seconds_median"]
        / figures[counts[0]]["round_seconds_median"]
    )
    figures["config"] = (
        f"{args.sampled} clients sampled per round (FedAvg), IID partition, full "
        f"data, cnn, {args.rounds} rounds (first excluded), PostgreSQL tracking"
    )
    max_conn = max(figures[c]["peak_db_connections"] for c in counts)
    save_result(
        "scale",
        figures,
        [
            target(
                f"round time at {counts[-1]} / {counts[0]} clients", flatness, "<=", 1.5
            ),
            target("peak database connections", max_conn, "<=", 20),
            target(
                "peak memory (GiB)",
                max(figures[c]["peak_rss_gib"] for c in counts),
                "<=",
                24,
                "GiB",
            ),
        ],
        notes="The clients sampled each round hold 1/N of the data, so a round's "
        "training work shrinks as N grows; what stays flat is the cost of having N "
        "clients registered (sampling, messages, tracking). Connections are those "
        "PostgreSQL reports for the whole run: one pool per process (server and "
        "each Ray worker), not one per client.",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
