"""Export a run's rows as JSON or one long CSV table."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from persistence.errors import RunNotFoundError
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

# Table name -> model, in the order an export lists them.
EXPORT_TABLES: dict[str, type[Base]] = {
    "runs": Run,
    "clients": Client,
    "server_evaluations": ServerEvaluation,
    "run_metrics": RunMetric,
    "client_failures": ClientFailure,
    "client_evaluations": ClientEvaluation,
    "test_evaluations": TestEvaluation,
    "privacy_spent": PrivacySpent,
}


def row_dict(row: Base) -> dict[str, Any]:
    """Return a row's columns as JSON-ready values: ISO times, NaN as None."""
    values: dict[str, Any] = {}
    for column in row.__table__.columns:
        value = getattr(row, column.key)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, float) and math.isnan(value):
            value = None
        values[column.key] = value
    return values


def export_run(session: Session, run_id: int) -> dict[str, list[dict[str, Any]]]:
    """Return a run's rows of every table (``EXPORT_TABLES``), by table name.

    Raises:
        RunNotFoundError: the run has no row.
    """
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(run_id)
    tables: dict[str, list[dict[str, Any]]] = {"runs": [row_dict(run)]}
    for name, model in list(EXPORT_TABLES.items())[1:]:
        table = model.__table__
        stmt = select(model).where(table.c.run_id == run_id).order_by(table.c.id)
        tables[name] = [row_dict(row) for row in session.scalars(stmt)]
    return tables


def csv_cell(value: Any) -> str:
    """Format one exported value for CSV: '' for NULL, repr for floats."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def json_text(tables: dict[str, list[dict[str, Any]]]) -> str:
    """Return an exported run as one indented JSON object."""
    document = {
        "run": tables["runs"][0],
        "clients": tables["clients"],
        "server_evaluations": tables["server_evaluations"],
        "metrics": tables["run_metrics"],
        "client_failures": tables["client_failures"],
        "client_evaluations": tables["client_evaluations"],
        "test_evaluations": tables["test_evaluations"],
        "privacy_spent": tables["privacy_spent"],
    }
    return json.dumps(document, indent=2) + "\n"


def csv_text(tables: dict[str, list[dict[str, Any]]]) -> str:
    """Return an exported run as one long CSV table (see ``runs export --help``)."""
    header = ["table"]
    for model in EXPORT_TABLES.values():
        header += [c.key for c in model.__table__.columns if c.key not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for name, rows in tables.items():
        for row in rows:
            writer.writerow({"table": name, **{k: csv_cell(v) for k, v in row.items()}})
    return buffer.getvalue()
