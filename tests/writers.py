"""A metric writer for the multi-process SQLite test, in a module of its own.

Spawned processes import the module of their target: this one imports only the
persistence layer, so eight of them start in a fraction of the time the test
module (and its Flower and torch imports) would take.
"""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from pathlib import Path

from persistence import repositories as repo
from persistence.entries import MetricBatch
from persistence.spool import DurableWriter


def write_for(url: str, spool: str, worker: int, seconds: float, queue: Queue) -> None:
    """Write metric batches for `seconds`; report (rows written, failures, left)."""
    writer = DurableWriter(url, Path(spool) / f"w{worker}")
    rows = failures = step = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        points = [
            repo.MetricPoint(f"m{i}", float(step), step=step, dataset_type="train")
            for i in range(10)
        ]
        batch = MetricBatch(run_id=1, points=points, client_identifier=f"w{worker}")
        try:
            writer.write(batch.to_entry())
        except Exception:  # noqa: BLE001 - counted, asserted to be zero
            failures += 1
        rows += len(points)
        step += 1
    left = writer.flush(timeout_s=60)
    queue.put((rows, failures, left))
