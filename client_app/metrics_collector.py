"""MetricsCollectorCallback: persist training metrics without orphan rows.

Every metric references a run that exists: in federated training the server
creates the run before round 1 and hands its id to the clients; in centralized
training the collector creates the run from an ``experiment_id``. A ``run_id``
that does not exist is an error, never a reason to create another run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from client_app.metric_keys import dataset_type_of
from client_app.trainer import Callback
from persistence import repositories as repo
from persistence.db import default_database_url, get_engine, session_scope
from persistence.entries import MetricBatch, score_on_test_entry
from persistence.errors import FailedRunError
from persistence.models import RunStatus
from persistence.repositories import MetricPoint
from persistence.spool import SPOOL_DIRNAME, DurableWriter, is_transient

log = logging.getLogger(__name__)

# JSON Lines: one object per metric, appended each epoch (never rewritten).
JSON_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
CSV_FIELDS = ("round", "epoch", "metric_name", "value", "dataset_type")
# Summary keys of the kept model's test score (the trainer's final_test_*).
TEST_PREFIX = "final_test_"


class MissingRunError(FailedRunError, LookupError):
    """A run id that has no row: the collector refuses to invent a run."""


class MetricsCollectorCallback(Callback):
    """Collect per-epoch metrics into JSON/CSV files and the tracking database.

    Args:
        save_dir: Folder for ``metrics.jsonl``, ``metrics.csv`` and the spool.
        experiment_name: Name used for the run's files and logs.
        run_id: Database id of an existing run (required in federated mode).
        experiment_id: Experiment to create a centralized run in.
        training_mode: ``centralized`` or ``federated``.
        enable_db_persistence: Write to the database (files are always written).
        database_url: Tracking database (default: $DATABASE_URL, else SQLite).
        client_identifier: The client this collector reports for (federated).
        round_number: The federated round being trained.
        partition_id: The client's data partition.
        node_id: Flower's node id of the client.
        num_examples: Training examples the client holds.
        relay: Hand rows back (``relay_batches``) instead of writing them.
        run_fields: Extra ``runs`` columns when the collector creates the run.
        flush_timeout_s: How long ``persist_to_database`` retries a down database.
    """

    def __init__(
        self,
        save_dir: str | Path,
        experiment_name: str = "experiment",
        run_id: int | None = None,
        experiment_id: int | None = None,
        training_mode: str = "centralized",
        enable_db_persistence: bool = True,
        *,
        database_url: str | None = None,
        client_identifier: str | None = None,
        round_number: int | None = None,
        partition_id: int | None = None,
        node_id: int | str | None = None,
        num_examples: int | None = None,
        relay: bool = False,
        run_fields: Mapping[str, Any] | None = None,
        flush_timeout_s: float = 60.0,
    ) -> None:
        if training_mode not in ("centralized", "federated"):
            raise ValueError(
                f"training_mode {training_mode!r} is not one of centralized, federated"
            )
        self.save_dir = Path(save_dir)
        self.experiment_name = experiment_name
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.training_mode = training_mode
        self.enable_db_persistence = enable_db_persistence
        self.database_url = database_url or default_database_url()
        self.client_identifier = client_identifier
        self.round_number = round_number
        self.partition_id = partition_id
        self.node_id = None if node_id is None else str(node_id)
        self.num_examples = num_examples
        self.relay = relay
        self.run_fields = dict(run_fields or {})
        self.flush_timeout_s = flush_timeout_s
        self.relay_batches: list[MetricBatch] = []
        self.records: list[dict[str, Any]] = []
        self._owns_run = False
        self._epochs_done = 0
        self._run_checked = False
        self._writer: DurableWriter | None = None

    # Run lifecycle -----------------------------------------------------------

    def _ensure_run_exists(self, db: Session) -> int:
        """Return the run id to write against, creating a centralized run once.

        Raises:
            MissingRunError: ``run_id`` was given but has no row.
            ValueError: federated mode without ``run_id``, or neither
                ``run_id`` nor ``experiment_id``.
        """
        if self.run_id is not None:
            if repo.get_run(db, self.run_id) is None:
                raise MissingRunError(
                    f"run_id {self.run_id} does not exist; metrics are only "
                    "written against an existing run (federated runs are "
                    "created by the ServerApp)"
                )
            return self.run_id
        if self.training_mode == "federated":
            raise ValueError(
                "training_mode='federated' requires run_id: federated runs are "
                "created only by the ServerApp"
            )
        if self.experiment_id is None:
            raise ValueError("experiment_id is required when run_id is not provided")
        if repo.get_experiment(db, self.experiment_id) is None:
            raise MissingRunError(f"experiment_id {self.experiment_id} does not exist")
        run = repo.create_run(
            db,
            experiment_id=self.experiment_id,
            training_mode=self.training_mode,
            outputs_path=str(self.save_dir),
            **self.run_fields,
        )
        self.run_id = run.id
        self._owns_run = True
        log.info("created %s run %d", self.training_mode, run.id)
        return run.id

    def _engine_session(self) -> Any:
        return session_scope(get_engine(self.database_url))

    def _check_run(self) -> None:
        if self._run_checked or not self.enable_db_persistence or self.relay:
            return
        try:
            with self._engine_session() as db:
                self._ensure_run_exists(db)
        except Exception as exc:
            # A given run id that cannot be checked right now (database down)
            # is checked again later; its rows wait in the spool meanwhile and
            # the foreign key still refuses them if the run does not exist.
            if self.run_id is None or not is_transient(exc):
                raise
            log.warning("cannot check run %s now: %s", self.run_id, exc)
            return
        self._run_checked = True

    def on_train_start(self) -> None:
        """Make sure the run exists before the first epoch."""
        self._check_run()

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        """Store the final summary, flush pending rows and close an owned run."""
        numeric = {
            k: float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if numeric:
            step = int(summary.get("best_epoch", 0))
            self._record(step, {k: v for k, v in numeric.items() if k != "best_epoch"})
            self._record_test(step, numeric)
        self.persist_to_database()
        if self._owns_run:
            self._close_run(
                RunStatus.COMPLETED, checkpoint=summary.get("checkpoint_path")
            )

    def on_train_error(self, exc: BaseException) -> None:
        """Flush what was measured and mark an owned run failed with the reason."""
        if not self.enable_db_persistence or self.relay:
            return
        try:
            self.persist_to_database()
        finally:
            if self._owns_run:
                detail = str(exc) or (
                    "interrupted by the user (Ctrl-C)"
                    if isinstance(exc, KeyboardInterrupt)
                    else "no message"
                )
                reason = f"{type(exc).__name__}: {detail}"
                self._close_run(RunStatus.FAILED, error=reason)

    def _close_run(
        self, status: str, *, error: str | None = None, checkpoint: Any = None
    ) -> None:
        assert self.run_id is not None
        with self._engine_session() as db:
            # The epoch count again: a per-epoch update may have met a
            # database that was down.
            fields: dict[str, Any] = {"rounds_completed": self._epochs_done}
            if checkpoint:
                fields["checkpoint_path"] = str(checkpoint)
            repo.update_run(db, run_id=self.run_id, **fields)
            repo.finish_run(db, run_id=self.run_id, status=status, error_message=error)
        self._owns_run = False

    # Metrics -----------------------------------------------------------------

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Record one epoch's metrics: files always, database in one batch.

        A centralized run this collector created also gets its progress:
        ``rounds_completed`` counts its completed epochs (``num_rounds`` holds
        the planned epochs), so ``runs list`` shows how far it is.
        """
        self._record(epoch, metrics)
        if self._owns_run:
            self._epochs_done = max(self._epochs_done, int(epoch))
            self._update_progress()

    def _update_progress(self) -> None:
        assert self.run_id is not None
        try:
            with self._engine_session() as db:
                repo.update_run(
                    db, run_id=self.run_id, rounds_completed=self._epochs_done
                )
        except Exception as exc:
            # Progress is not worth failing training for: the metrics wait in
            # the spool, and the next epoch or the run's end writes it again.
            if not is_transient(exc):
                raise
            log.warning("cannot record epoch %d now: %s", self._epochs_done, exc)

    def _record(self, step: int, metrics: Mapping[str, float]) -> None:
        points = [
            MetricPoint(
                metric_name=name,
                value=float(value),
                step=int(step),
                dataset_type=dataset_type_of(name),
                round_number=self.round_number,
            )
            for name, value in metrics.items()
        ]
        self._write_files(step, points)
        if not self.enable_db_persistence:
            return
        if self.relay:
            self.relay_batches.append(self._batch(points, run_id=self.run_id or 0))
            return
        self._check_run()
        assert self.run_id is not None
        self.writer.write(self._batch(points, run_id=self.run_id).to_entry())

    def _record_test(self, step: int, summary: Mapping[str, float]) -> None:
        """Store the kept model's test score apart, as federated runs do."""
        test = {
            k.removeprefix(TEST_PREFIX): v
            for k, v in summary.items()
            if k.startswith(TEST_PREFIX)
        }
        if not test or not self.enable_db_persistence or self.relay:
            return
        assert self.run_id is not None
        self.writer.write(score_on_test_entry(self.run_id, step, test))

    def _batch(self, points: list[MetricPoint], *, run_id: int) -> MetricBatch:
        return MetricBatch(
            run_id=run_id,
            points=points,
            client_identifier=self.client_identifier,
            partition_id=self.partition_id,
            node_id=self.node_id,
            num_examples=self.num_examples,
        )

    @property
    def writer(self) -> DurableWriter:
        """The spool-backed database writer (created on first use)."""
        if self._writer is None:
            self._writer = DurableWriter(
                self.database_url, self.save_dir / SPOOL_DIRNAME
            )
        return self._writer

    def persist_to_database(self) -> int:
        """Commit everything spooled; return how many batches are still pending."""
        if not self.enable_db_persistence or self.relay:
            return 0
        return self.writer.flush(self.flush_timeout_s)

    # Files -------------------------------------------------------------------

    def _write_files(self, step: int, points: list[MetricPoint]) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "round": p.round_number,
                "epoch": step,
                "metric_name": p.metric_name,
                "value": p.value,
                "dataset_type": p.dataset_type,
            }
            for p in points
        ]
        self.records.extend(rows)
        csv_path = self.save_dir / CSV_NAME
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        with (self.save_dir / JSON_NAME).open("a") as fh:
            for r in rows:
                finite = math.isfinite(r["value"])
                value = r["value"] if finite else str(r["value"])
                fh.write(json.dumps({**r, "value": value}) + "\n")
