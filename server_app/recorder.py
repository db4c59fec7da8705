"""The server's record of a federated run: one Run row and everything under it.

Per-round writes go through the durable spool, so a database that is down
mid-run delays rows instead of losing them; run status changes are retried.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

from client_app.metric_keys import dataset_type_of
from persistence import repositories as repo
from persistence.db import get_engine, mask_url, session_scope
from persistence.entries import (
    ClientEvaluationRound,
    EvaluationRecord,
    HospitalScore,
    MetricBatch,
    privacy_entry,
    run_finish_entry,
    score_on_test_entry,
)
from persistence.errors import FailedRunError
from persistence.repositories import MetricPoint
from persistence.spool import (
    SPOOL_DIRNAME,
    DurableWriter,
    find_spool_dirs,
    is_transient,
    pending_files,
    replay,
)
from server_app.events import TRACKING_DOWN, TRACKING_PENDING, TRACKING_UP, emit

log = logging.getLogger(__name__)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HEARTBEAT_INTERVAL_S = 30.0
DEFAULT_OUTAGE_TIMEOUT_S = 300.0
# A database that is up answers at once; this bounds the retries of a
# status write when the outage budget is already spent.
MIN_CLOSE_TIMEOUT_S = 5.0


class TrackingOutageError(FailedRunError):
    """The tracking database stayed unreachable past tracking.outage_timeout_s."""


ERROR_LINE = re.compile(r"^([\w.]+(?:Error|Exception|Interrupt)): (.+)$")
DEPLOYED_ERROR = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.S)
WRAPPERS = ("ClientAppException",)


def concise_reason(text: str, limit: int = 500) -> str:
    """Return ``ErrorType: message`` of the original error in an error text.

    Simulation errors are Ray tracebacks with the client's own exception
    first and Flower's wrappers after it; deployed ones are one short line.
    """
    lines = [ln.strip() for ln in ANSI.sub("", text).splitlines() if ln.strip()]
    for line in lines:
        match = ERROR_LINE.match(line)
        if match and not match.group(1).endswith(WRAPPERS):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"[:limit]
    deployed = DEPLOYED_ERROR.search(text)
    if deployed:
        return f"{deployed.group(1).rsplit('.', 1)[-1]}: {deployed.group(2)}"[:limit]
    return (lines[-1] if lines else "unknown error")[:limit]


class RunRecorder:
    """Write a run's rows; ``run_id`` 0 with ``url`` None records nothing.

    While the database is down, rows wait in the spool and training goes on
    for up to ``outage_timeout_s``; after that the run stops at the next
    round (``check_outage``) and its closing status is spooled too.
    """

    def __init__(
        self,
        url: str | None,
        run_id: int,
        run_dir: Path,
        outage_timeout_s: float = DEFAULT_OUTAGE_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.run_id = run_id
        self.run_dir = run_dir
        self.outage_timeout_s = outage_timeout_s
        self.spool_dir = run_dir / "server" / SPOOL_DIRNAME
        self.writer = (
            DurableWriter(url, self.spool_dir, on_change=self._announce)
            if url
            else None
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Column values not yet stored because the database was down.
        self._pending_fields: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        """Whether rows are written at all."""
        return self.writer is not None

    # Per-round rows (spooled) ------------------------------------------------

    def record_evaluation(
        self, round_number: int, metrics: Mapping[str, float], seconds: float
    ) -> None:
        """Store the server's evaluation of the global model."""
        if self.writer:
            record = EvaluationRecord(
                run_id=self.run_id,
                round_number=round_number,
                metrics=dict(metrics),
                eval_seconds=seconds,
            )
            self.writer.write(record.to_entry())

    def record_client_evaluations(
        self, round_number: int, scores: list[HospitalScore]
    ) -> None:
        """Store each hospital's score of a round's global model."""
        if self.writer and scores:
            entry = ClientEvaluationRound(self.run_id, round_number, scores)
            self.writer.write(entry.to_entry())

    def record_test(self, round_number: int, metrics: Mapping[str, float]) -> None:
        """Store the end-of-run test score of the model kept from ``round_number``."""
        if self.writer:
            self.writer.write(score_on_test_entry(self.run_id, round_number, metrics))

    def record_privacy(self, round_number: int, spent: Mapping[str, Any]) -> None:
        """Store the privacy budget spent once a round's model is released."""
        log.info(
            "round %d: epsilon %.4f at delta %g after %d releases",
            round_number,
            spent["epsilon"],
            spent["delta"],
            spent["releases"],
        )
        if self.writer:
            self.writer.write(privacy_entry(self.run_id, round_number, spent))

    def record_client_rows(
        self,
        points: list[MetricPoint],
        *,
        client_identifier: str,
        partition_id: int | None,
        node_id: int | str | None,
        num_examples: int | None,
    ) -> None:
        """Store metric rows a client relayed in its reply."""
        if self.writer and points:
            batch = MetricBatch(
                run_id=self.run_id,
                points=points,
                client_identifier=client_identifier,
                partition_id=partition_id,
                node_id=None if node_id is None else str(node_id),
                num_examples=num_examples,
            )
            self.writer.write(batch.to_entry())

    def record_aggregate(self, round_number: int, metrics: Mapping[str, float]) -> None:
        """Store a round's metrics aggregated over clients (no client id)."""
        if not self.writer:
            return
        points = [
            MetricPoint(
                metric_name=name,
                value=float(value),
                step=0,
                dataset_type=dataset_type_of(name),
                round_number=round_number,
            )
            for name, value in metrics.items()
            if isinstance(value, int | float)
        ]
        self.writer.write(MetricBatch(run_id=self.run_id, points=points).to_entry())

    def record_failure(
        self,
        round_number: int,
        node_id: int,
        reason: str,
        client_identifier: str | None,
    ) -> None:
        """Store a client that raised instead of replying."""
        log.warning(
            "round %d: client %s (node %d) failed: %s",
            round_number,
            client_identifier or "?",
            node_id,
            reason,
        )
        if self.writer:
            self.writer.write(
                {
                    "kind": "client_failure",
                    "batch_id": f"failure-{self.run_id}-{round_number}-{node_id}",
                    "run_id": self.run_id,
                    "round_number": round_number,
                    "node_id": str(node_id),
                    "client_identifier": client_identifier,
                    "reason": reason,
                }
            )

    # Outages ------------------------------------------------------------------

    def _announce(self, reachable: bool, detail: str) -> None:
        if reachable:
            emit(TRACKING_UP, run_id=self.run_id)
        else:
            emit(
                TRACKING_DOWN,
                run_id=self.run_id,
                spool=str(self.run_dir),
                detail=detail,
                timeout_s=self.outage_timeout_s,
            )

    def outage_seconds(self) -> float:
        """Seconds the database has been unreachable (0 while it is up)."""
        since = self.writer.down_since if self.writer else None
        return 0.0 if since is None else time.monotonic() - since

    def check_outage(self, round_number: int) -> None:
        """Stop the run if the database has been down past the outage timeout."""
        if not self.writer or self.outage_seconds() < self.outage_timeout_s:
            return
        self.writer.flush(0)  # one more try: it may be back since the last one
        down = self.outage_seconds()
        if down >= self.outage_timeout_s:
            raise TrackingOutageError(
                f"tracking database {mask_url(self.url or '')} unreachable for "
                f"{down:.0f} s (tracking.outage_timeout_s="
                f"{self.outage_timeout_s:g}); stopped after round {round_number}"
            )

    def _budget_s(self) -> float:
        """Seconds left to wait for the database before giving up on it."""
        return max(self.outage_timeout_s - self.outage_seconds(), MIN_CLOSE_TIMEOUT_S)

    def close(self, status: str, error: str | None = None) -> bool:
        """Replay the spools and close the run within the outage budget.

        Returns True when the status is stored. Otherwise the database is
        still down: the status waits in the spool for ``fedpneumo sync``,
        which applies it after every row, and an event says where it is.
        """
        self._stop.set()
        if not self.url:
            return True
        pending = self.replay_all(timeout_s=self._budget_s())
        if not pending:
            try:
                self.finish(status, error, timeout_s=self._budget_s())
                return True
            except Exception as exc:
                if not is_transient(exc):
                    raise
        assert self.writer is not None
        entry = run_finish_entry(self.run_id, status, error, self._pending_fields)
        self.writer.spool(entry)
        left = sum(len(pending_files(f)) for f in find_spool_dirs(self.run_dir))
        emit(
            TRACKING_PENDING,
            run_id=self.run_id,
            status=status,
            pending=left,
            spool=str(self.run_dir),
        )
        return False

    # Run row -----------------------------------------------------------------

    def _retrying(self, timeout_s: float) -> Retrying:
        return Retrying(
            stop=stop_before_delay(timeout_s),
            wait=wait_exponential(multiplier=0.5, max=15),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )

    def update(self, **fields: Any) -> None:
        """Set run columns and the heartbeat; kept for later if the db is down."""
        if not self.url:
            return
        pending = {**self._pending_fields, **fields}
        try:
            with session_scope(get_engine(self.url)) as db:
                repo.update_run(db, run_id=self.run_id, **pending)
        except Exception as exc:
            if not is_transient(exc):
                # Values the database rejects are not kept: they would fail
                # every later update and the run could never be closed.
                raise
            self._pending_fields = pending
            log.debug("run update deferred: %s", str(exc).splitlines()[0])
            return
        self._pending_fields = {}

    def start_heartbeat(self) -> None:
        """Refresh the run's heartbeat in the background while the run lives."""
        if not self.url or self._thread is not None:
            return

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_INTERVAL_S):
                self.update()

        self._thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._thread.start()

    def replay_all(self, timeout_s: float) -> int:
        """Commit every spool of this run (server's and clients'); return pending."""
        if not self.url:
            return 0
        folders = find_spool_dirs(self.run_dir)
        try:
            for attempt in self._retrying(timeout_s):
                with attempt:
                    for folder in folders:
                        replay(self.url, pending_files(folder))
        except Exception as exc:
            if not is_transient(exc):
                raise
        left = sum(len(pending_files(f)) for f in folders)
        if not left and self.writer:
            # The spools drained: if the writer was still backing off from an
            # outage, this is where the database is known to be back.
            self.writer.reachable()
        if left:
            log.error(
                "%d metric batches could not be written to %s; they are kept under "
                "%s: run `fedpneumo sync --outputs %s` when the database is back",
                left,
                mask_url(self.url),
                self.run_dir,
                self.run_dir,
            )
        return left

    def finish(self, status: str, error: str | None, timeout_s: float) -> None:
        """Close the run, retrying while the database is unreachable."""
        self._stop.set()
        if not self.url:
            return
        for attempt in self._retrying(timeout_s):
            with attempt, session_scope(get_engine(self.url)) as db:
                if self._pending_fields:
                    repo.update_run(db, run_id=self.run_id, **self._pending_fields)
                repo.finish_run(
                    db, run_id=self.run_id, status=status, error_message=error
                )
        self._pending_fields = {}
