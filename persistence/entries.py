"""Spool entries: metric batches, evaluations, failures, run closings; their writes.

Entries are plain JSON-able dicts with a ``kind`` and a ``batch_id``; writing
one is idempotent, so replaying a spool file twice stores nothing new.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from persistence import repositories as repo
from persistence.column_types import utcnow
from persistence.models import Run
from persistence.repositories import MAX_ID, MetricPoint


@dataclass
class MetricBatch:
    """Metric points of one run (and optionally one client) written together."""

    run_id: int
    points: list[MetricPoint]
    client_identifier: str | None = None
    partition_id: int | None = None
    node_id: str | None = None
    num_examples: int | None = None
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # When the metrics were measured: rows keep it even if written later.
    recorded_at: str = field(default_factory=lambda: utcnow().isoformat())

    def to_entry(self) -> dict[str, Any]:
        """Return a JSON-able spool entry (points as columns: compact and fast)."""
        entry = {f.name: getattr(self, f.name) for f in fields(self)}
        entry["points"] = points_to_columns(self.points)
        return {"kind": "metrics", **entry}


@dataclass
class EvaluationRecord:
    """The server's evaluation of one round."""

    run_id: int
    round_number: int
    metrics: dict[str, float]
    eval_seconds: float | None = None
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_entry(self) -> dict[str, Any]:
        """Return a JSON-able spool entry."""
        entry = asdict(self)
        entry["metrics"] = {k: float(v) for k, v in self.metrics.items()}
        return {"kind": "server_evaluation", **entry}


@dataclass
class HospitalScore:
    """One hospital's score of a round's global model, as its reply carried it."""

    client_identifier: str
    metrics: dict[str, float]
    partition_id: int | None = None
    node_id: str | None = None
    # The hospital's training examples (its ``clients`` row), not the slice's.
    num_examples: int | None = None


@dataclass
class ClientEvaluationRound:
    """Every hospital's score of one round's global model, written together."""

    run_id: int
    round_number: int
    scores: list[HospitalScore]
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_entry(self) -> dict[str, Any]:
        """Return a JSON-able spool entry."""
        entry = asdict(self)
        for score in entry["scores"]:
            score["metrics"] = {k: float(v) for k, v in score["metrics"].items()}
        return {"kind": "client_evaluations", **entry}


def score_on_test_entry(
    run_id: int, round_number: int, metrics: Mapping[str, float]
) -> dict[str, Any]:
    """Return the entry of a run's end-of-run test score (one per run)."""
    return {
        "kind": "test_evaluation",
        "batch_id": f"test_evaluation-{run_id}",
        "run_id": run_id,
        "round_number": round_number,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def privacy_entry(
    run_id: int, round_number: int, spent: Mapping[str, Any]
) -> dict[str, Any]:
    """Return the entry of the privacy budget spent after a round."""
    return {
        "kind": "privacy_spent",
        "batch_id": f"privacy_spent-{run_id}-{round_number}",
        "run_id": run_id,
        "round_number": round_number,
        "spent": dict(spent),
    }


def points_to_columns(points: list[MetricPoint]) -> dict[str, list[Any]]:
    """Pack metric points as parallel lists (JSON- and ConfigRecord-friendly).

    Values stay floats, NaN and infinities included (Python's json writes and
    reads them; Flower records take them); a missing round is -1, since each
    list must hold one type.
    """
    return {
        "names": [p.metric_name for p in points],
        "values": [float(p.value) for p in points],
        "steps": [int(p.step) for p in points],
        "splits": [p.dataset_type for p in points],
        "rounds": [-1 if p.round_number is None else p.round_number for p in points],
    }


def points_from_columns(columns: Mapping[str, Any]) -> list[MetricPoint]:
    """Unpack metric points packed by ``points_to_columns``."""
    return [
        MetricPoint(
            metric_name=name,
            value=float(value),
            step=int(step),
            dataset_type=split,
            round_number=None if int(rnd) < 0 else int(rnd),
        )
        for name, value, step, split, rnd in zip(
            columns["names"],
            columns["values"],
            columns["steps"],
            columns["splits"],
            columns["rounds"],
            strict=True,
        )
    ]


def apply_entry(session: Any, entry: Mapping[str, Any]) -> int:
    """Write one spool entry in the given session; return rows newly stored."""
    kind = entry.get("kind")
    if kind == "metrics":
        client_id = None
        if entry.get("client_identifier"):
            client = repo.get_or_create_client(
                session,
                run_id=entry["run_id"],
                client_identifier=entry["client_identifier"],
                partition_id=entry.get("partition_id"),
                node_id=entry.get("node_id"),
                num_examples=entry.get("num_examples"),
            )
            client_id = client.id
        points = points_from_columns(entry["points"])
        recorded = entry.get("recorded_at")
        return repo.add_metrics(
            session,
            run_id=entry["run_id"],
            client_id=client_id,
            points=points,
            recorded_at=datetime.fromisoformat(recorded) if recorded else None,
        )
    if kind == "server_evaluation":
        metrics = {k: float(v) for k, v in entry["metrics"].items()}
        stored = repo.add_server_evaluation(
            session,
            run_id=entry["run_id"],
            round_number=entry["round_number"],
            metrics=metrics,
            eval_seconds=entry.get("eval_seconds"),
        )
        return int(stored)
    if kind == "client_evaluations":
        return _add_client_evaluations(session, entry)
    if kind == "test_evaluation":
        stored = repo.add_test_evaluation(
            session,
            run_id=entry["run_id"],
            round_number=entry["round_number"],
            metrics={k: float(v) for k, v in entry["metrics"].items()},
        )
        return int(stored)
    if kind == "privacy_spent":
        stored = repo.add_privacy_spent(
            session,
            run_id=entry["run_id"],
            round_number=entry["round_number"],
            spent=entry["spent"],
        )
        return int(stored)
    if kind == "client_failure":
        stored = repo.add_client_failure(
            session,
            run_id=entry["run_id"],
            round_number=entry["round_number"],
            node_id=entry["node_id"],
            reason=entry["reason"],
            client_identifier=entry.get("client_identifier"),
        )
        return int(stored)
    if kind == "run_finish":
        return _finish_run(session, entry)
    raise ValueError(f"unknown spool entry kind {kind!r}")


def _add_client_evaluations(session: Any, entry: Mapping[str, Any]) -> int:
    stored = 0
    for score in entry["scores"]:
        client = repo.get_or_create_client(
            session,
            run_id=entry["run_id"],
            client_identifier=score["client_identifier"],
            partition_id=score.get("partition_id"),
            node_id=score.get("node_id"),
            num_examples=score.get("num_examples"),
        )
        stored += repo.add_client_evaluation(
            session,
            run_id=entry["run_id"],
            client_id=client.id,
            round_number=entry["round_number"],
            metrics={k: float(v) for k, v in score["metrics"].items()},
        )
    return stored


def run_finish_entry(
    run_id: int, status: str, error: str | None, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Return the entry that closes a run once the database is reachable."""
    return {
        "kind": "run_finish",
        "batch_id": f"run_finish-{run_id}",
        "run_id": run_id,
        "status": status,
        "error": error,
        "fields": dict(fields),
    }


def _finish_run(session: Any, entry: Mapping[str, Any]) -> int:
    # Only a run still in progress is closed: a run resumed and finished
    # since then has a newer status that a late replay must not overwrite.
    run = repo.require_run(session, entry["run_id"])
    if run.status != "in_progress":
        return 0
    fields = dict(entry.get("fields") or {})
    rounds = fields.pop("rounds_completed", None)
    if rounds is not None:
        fields["rounds_completed"] = max(int(rounds), run.rounds_completed or 0)
    repo.update_run(session, run_id=run.id, **fields)
    repo.finish_run(
        session, run_id=run.id, status=entry["status"], error_message=entry["error"]
    )
    return 0


class BadEntry(ValueError):
    """A spool file that can never be replayed (not JSON, wrong fields)."""


# Entry validation for `fedpneumo sync`: a file that fails it is set aside.
_RUN_ID = (True, (int,))
_ENTRY_FIELDS: dict[str, dict[str, tuple[bool, tuple[type, ...]]]] = {
    "metrics": {
        "run_id": _RUN_ID,
        "points": (True, (dict,)),
        "client_identifier": (False, (str,)),
        "partition_id": (False, (int,)),
        "node_id": (False, (str, int)),
        "num_examples": (False, (int,)),
        "recorded_at": (False, (str,)),
    },
    "server_evaluation": {
        "run_id": _RUN_ID,
        "round_number": (True, (int,)),
        "metrics": (True, (dict,)),
        "eval_seconds": (False, (int, float)),
    },
    "client_evaluations": {
        "run_id": _RUN_ID,
        "round_number": (True, (int,)),
        "scores": (True, (list,)),
    },
    "test_evaluation": {
        "run_id": _RUN_ID,
        "round_number": (True, (int,)),
        "metrics": (True, (dict,)),
    },
    "privacy_spent": {
        "run_id": _RUN_ID,
        "round_number": (True, (int,)),
        "spent": (True, (dict,)),
    },
    "client_failure": {
        "run_id": _RUN_ID,
        "round_number": (True, (int,)),
        "node_id": (True, (str, int)),
        "reason": (True, (str,)),
        "client_identifier": (False, (str,)),
    },
    "run_finish": {
        "run_id": _RUN_ID,
        "status": (True, (str,)),
        "error": (False, (str,)),
        "fields": (False, (dict,)),
    },
}
_POINT_COLUMNS = {
    "names": (str,),
    "values": (int, float),
    "steps": (int,),
    "splits": (str,),
    "rounds": (int,),
}


def _plain_type(column_type: Any) -> type:
    try:
        return column_type.python_type
    except NotImplementedError:
        return object


# Run columns a closing entry may set, with their JSON types; datetimes
# cannot travel in JSON, and ids are not the entry's to change.
_FINISH_FIELDS: dict[str, tuple[type, ...]] = {
    c.key: (c.type.python_type,)
    for c in Run.__table__.columns
    if c.key not in ("id", "experiment_id") and _plain_type(c.type) in (int, str, float)
}
_FINISH_FIELDS["config"] = (dict,)


def check_entry(entry: Any) -> None:
    """Raise BadEntry unless ``entry`` has the fields and types its kind needs.

    Checked before the database sees it, so that a malformed file is set
    aside with a reason instead of failing somewhere inside the write.
    """
    if not isinstance(entry, dict):
        raise BadEntry(f"the entry is a JSON {_json_type(entry)}, not an object")
    kind = entry.get("kind")
    spec = _ENTRY_FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise BadEntry(f"kind {kind!r} is not one of: {', '.join(_ENTRY_FIELDS)}")
    _check_fields(f"{kind} entry", "", entry, spec)
    if not 1 <= entry["run_id"] <= MAX_ID:
        raise BadEntry(f"run_id {entry['run_id']} is not a run id (1 to {MAX_ID})")
    if kind == "metrics":
        _check_points(entry["points"])
        recorded = entry.get("recorded_at")
        if recorded is not None:
            try:
                datetime.fromisoformat(recorded)
            except ValueError:
                raise BadEntry(
                    f"recorded_at {recorded!r} is not an ISO 8601 time"
                ) from None
    elif kind in ("server_evaluation", "test_evaluation"):
        _check_metrics("metrics", entry["metrics"])
    elif kind == "privacy_spent":
        _check_metrics("spent", entry["spent"])
    elif kind == "client_evaluations":
        for i, score in enumerate(entry["scores"]):
            _check_score(f"scores[{i}]", score)
    elif kind == "run_finish":
        for key, value in (entry.get("fields") or {}).items():
            types = _FINISH_FIELDS.get(key)
            if types is None:
                raise BadEntry(
                    f"fields.{key} cannot be set by a closing entry; it can set"
                    f" {', '.join(sorted(_FINISH_FIELDS))}"
                )
            if value is not None:
                _check_value(f"fields.{key}", value, types)


def _check_metrics(name: str, metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if value is not None:
            _check_value(f"{name}.{key}", value, (int, float))


_SCORE_FIELDS: dict[str, tuple[bool, tuple[type, ...]]] = {
    "client_identifier": (True, (str,)),
    "metrics": (True, (dict,)),
    "partition_id": (False, (int,)),
    "node_id": (False, (str, int)),
    "num_examples": (False, (int,)),
}


def _check_fields(
    what: str,
    prefix: str,
    obj: dict[str, Any],
    spec: Mapping[str, tuple[bool, tuple[type, ...]]],
) -> None:
    for key, (required, types) in spec.items():
        value = obj.get(key)
        if value is None:
            if required:
                raise BadEntry(f"{what} has no {key!r} (or it is null)")
            continue
        _check_value(f"{prefix}{key}", value, types)


def _check_score(name: str, score: Any) -> None:
    if not isinstance(score, dict):
        raise BadEntry(f"{name} is {_json_type(score)}, not an object")
    _check_fields(name, f"{name}.", score, _SCORE_FIELDS)
    _check_metrics(f"{name}.metrics", score["metrics"])


def _check_points(points: dict[str, Any]) -> None:
    lengths = set()
    for name, types in _POINT_COLUMNS.items():
        column = points.get(name)
        if not isinstance(column, list):
            raise BadEntry(f"points.{name} is not a list")
        for value in column:
            _check_value(f"points.{name}", value, types)
        lengths.add(len(column))
    if len(lengths) > 1:
        raise BadEntry("the points lists are not all the same length")


def _check_value(name: str, value: Any, types: tuple[type, ...]) -> None:
    # JSON true/false are Python bools, which are ints too: not a number here.
    if isinstance(value, bool) or not isinstance(value, types):
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise BadEntry(f"{name} is {_json_type(value)} {_short(value)}, not {wanted}")
    if isinstance(value, int) and not -MAX_ID <= value <= MAX_ID:
        raise BadEntry(f"{name} {value} is out of the 64-bit integer range")


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
