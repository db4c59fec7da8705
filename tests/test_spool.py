"""The durable spool: batches survive an unavailable database and replay once."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from persistence import repositories as repo
from persistence.db import get_engine, session_scope, upgrade_database
from persistence.entries import MetricBatch
from persistence.models import RunMetric
from persistence.spool import DurableWriter, sync
from tests.pg_server import ThrowawayPostgres


def _batch(run_id: int, step: int, recorded_at: str | None = None) -> dict:
    points = [
        repo.MetricPoint("train_loss", 0.5, step, "train"),
        repo.MetricPoint("val_auroc", math.nan, step, "val"),
    ]
    batch = MetricBatch(run_id=run_id, points=points, client_identifier="c0")
    if recorded_at:
        batch.recorded_at = recorded_at
    return batch.to_entry()


def test_batches_wait_in_the_spool_until_the_database_exists(
    pg_server: ThrowawayPostgres, tmp_path: Path
) -> None:
    name = "created_later"
    url = pg_server.url(name)
    writer = DurableWriter(url, tmp_path / "spool", backoff_initial_s=0.01)
    earlier = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert writer.write(_batch(1, 1, recorded_at=earlier)) is False  # no database yet
    assert writer.write(_batch(1, 2)) is False
    assert len(writer.pending()) == 2
    assert writer.flush(timeout_s=0) == 2  # still unavailable: nothing lost

    pg_server.create_database(name)
    upgrade_database(url)
    with session_scope(get_engine(url)) as s:
        exp = repo.get_or_create_experiment(s, name="spool")
        assert (
            repo.create_run(s, experiment_id=exp.id, training_mode="federated").id == 1
        )
    assert writer.flush(timeout_s=30) == 0
    assert writer.pending() == []
    with session_scope(get_engine(url)) as s:
        rows = s.scalars(select(RunMetric).order_by(RunMetric.step)).all()
        assert [(r.step, r.metric_name, r.is_nan) for r in rows] == [
            (1, "train_loss", False),
            (1, "val_auroc", True),
            (2, "train_loss", False),
            (2, "val_auroc", True),
        ]
        # A replayed batch keeps the time it was measured, not the replay time.
        assert rows[0].timestamp == datetime.fromisoformat(earlier)


def test_sync_replays_once_and_rejects_what_cannot_land(
    db_url: str, tmp_path: Path
) -> None:
    with session_scope(get_engine(db_url)) as s:
        exp = repo.get_or_create_experiment(s, name="sync")
        run_id = repo.create_run(s, experiment_id=exp.id, training_mode="federated").id
    folder = tmp_path / "runs" / "1" / "clients" / "c0" / "spool"
    writer = DurableWriter(db_url, folder)
    entries = [_batch(run_id, 1), _batch(run_id, 1), _batch(9999, 1)]
    for entry in entries:
        writer.spool(entry)
    (folder / "zz-corrupt.json").write_text("{not json")
    files, stored, rejected = sync(db_url, tmp_path)
    assert (files, stored, rejected) == (4, 2, 2)  # duplicate batch: 0 new rows
    assert sync(db_url, tmp_path) == (0, 0, 0)
    rejected_files = sorted(p.name for p in (folder.parent / "rejected").iterdir())
    assert len(rejected_files) == 2
    with session_scope(get_engine(db_url)) as s:
        assert s.scalar(select(func.count()).select_from(RunMetric)) == 2
    # NaN survives the spool's JSON (Python writes and reads it).
    assert math.isnan(json.loads(json.dumps(entries[0]))["points"]["values"][1])
