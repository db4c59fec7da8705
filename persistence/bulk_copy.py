"""Bulk metric inserts through PostgreSQL's COPY, idempotent like the INSERT path."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from persistence.repositories import MetricPoint

# From this many rows on, PostgreSQL gets them through COPY (several times
# faster than a multi-row INSERT); smaller batches are not worth the extra
# round trips.
COPY_MIN_ROWS = 200
METRIC_COLUMNS = (
    "run_id",
    "client_id",
    "round_number",
    "metric_name",
    "metric_value",
    "is_nan",
    "step",
    "dataset_type",
    "timestamp",
)
_COLS = ", ".join(METRIC_COLUMNS)
_STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS run_metrics_staging ON COMMIT DELETE ROWS "
    f"AS SELECT {_COLS} FROM run_metrics WITH NO DATA"
)


def copy_metrics(session: Session, buffer: io.StringIO, count: int) -> int:
    """Insert CSV rows with COPY (PostgreSQL); return how many were new.

    A fresh batch is copied straight into ``run_metrics``. If any of its rows
    is already stored (a replay), the copy is rolled back to a savepoint and
    the batch goes through a staging table and ``ON CONFLICT DO NOTHING``.
    """
    import psycopg2
    from psycopg2 import errors

    connection = session.connection()
    try:
        connection.exec_driver_sql("SAVEPOINT fresh_batch")
        try:
            copy_into(connection, "run_metrics", buffer)
            connection.exec_driver_sql("RELEASE SAVEPOINT fresh_batch")
            return count
        except errors.UniqueViolation:
            connection.exec_driver_sql("ROLLBACK TO SAVEPOINT fresh_batch")
        buffer.seek(0)
        connection.exec_driver_sql(_STAGING_DDL)
        copy_into(connection, "run_metrics_staging", buffer)
    except psycopg2.Error as exc:  # raw cursor: wrap like SQLAlchemy would
        raise DBAPIError.instance(
            "COPY run_metrics", None, exc, psycopg2.Error
        ) from exc
    result = connection.exec_driver_sql(
        f"INSERT INTO run_metrics ({_COLS}) SELECT {_COLS} FROM run_metrics_staging "
        "ON CONFLICT DO NOTHING"
    )
    # Staging rows go at commit; clear them now for another batch in the
    # same transaction.
    connection.exec_driver_sql("DELETE FROM run_metrics_staging")
    return result.rowcount


def csv_rows(
    run_id: int,
    client_id: int | None,
    points: Sequence[MetricPoint],
    recorded_at: datetime,
) -> io.StringIO:
    """Write points as CSV for COPY, straight from the tuples (no row dicts)."""
    stamp = recorded_at.isoformat()
    buffer = io.StringIO()
    # Strings are quoted, so text stays text; FORCE_NULL in copy_into reads the
    # (quoted) empty value of the nullable columns as NULL.
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC)
    nan = math.isnan
    writer.writerows(
        (
            run_id,
            client_id,
            p.round_number,
            p.metric_name,
            None if nan(p.value) else float(p.value),
            "t" if nan(p.value) else "f",
            p.step,
            p.dataset_type,
            p.timestamp.isoformat() if p.timestamp else stamp,
        )
        for p in points
    )
    buffer.seek(0)
    return buffer


def copy_into(connection: Any, table: str, buffer: io.StringIO) -> None:
    """COPY CSV rows from buffer into a table with run_metrics' columns."""
    with connection.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(
            f"COPY {table} ({_COLS}) FROM STDIN WITH (FORMAT csv, "
            "FORCE_NULL (client_id, round_number, metric_value))",
            buffer,
        )
