"""Read-only views of tracked runs: liveness, listings, comparisons, exports.

Everything here returns plain dataclasses and dicts; rendering lives in
``fedpneumo.runs_cli`` and ``fedpneumo.plots``.
"""

from __future__ import annotations

import math
import socket
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from client_app.metric_keys import HEADLINE_KEYS
from fedpneumo.export import row_dict
from fedpneumo.flower import process_alive
from persistence.errors import RunNotFoundError
from persistence.models import (
    Client,
    ClientEvaluation,
    ClientFailure,
    Experiment,
    PrivacySpent,
    Run,
    RunMetric,
    RunStatus,
    ServerEvaluation,
    TestEvaluation,
)

DEFAULT_STALE_AFTER_S = 900.0
STALE = "stale"
TRAIN_LOSS = "train_loss"
VAL_AUROC = "val_auroc"
# Server evaluation columns; centralized runs log them per epoch as ``val_<name>``.
CURVE_FIELDS = HEADLINE_KEYS
# Curve fields whose best value is the lowest; every other one is best highest.
LOWER_IS_BETTER = frozenset({"loss", TRAIN_LOSS})


def is_stale(run: Run, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> bool:
    """Return True for an in-progress run whose owning process is gone.

    On the owner's host a dead pid decides at once; elsewhere the heartbeat
    must be older than ``stale_after_s``.
    """
    if run.status != RunStatus.IN_PROGRESS:
        return False
    if run.host == socket.gethostname() and run.pid and not process_alive(run.pid):
        return True
    beat = run.heartbeat_at or run.start_time
    return (datetime.now(UTC) - beat).total_seconds() > stale_after_s


@dataclass(frozen=True)
class CurvePoint:
    """Validation metrics of one federated round (server eval) or centralized epoch.

    ``train_loss`` is the round's aggregate over clients, or the epoch's loss.
    """

    step: int
    loss: float | None = None
    accuracy: float | None = None
    auroc: float | None = None
    f1_score: float | None = None
    precision: float | None = None
    recall: float | None = None
    train_loss: float | None = None


@dataclass(frozen=True)
class Scores:
    """A model's scores on some images; a rate that is undefined is None.

    ``auroc`` is None when the images hold one class; ``sensitivity`` when
    they hold no positives, ``specificity`` when they hold no negatives.
    """

    num_samples: int | None
    auroc: float | None
    accuracy: float | None
    f1_score: float | None
    sensitivity: float | None
    specificity: float | None


@dataclass(frozen=True)
class HospitalResult(Scores):
    """One hospital's score of a round's global model on its held-out slice."""

    identifier: str
    partition_id: int | None
    round_number: int


@dataclass(frozen=True)
class HospitalSpread:
    """The worst and best hospital of a round by AUROC, and who has none."""

    round_number: int
    worst: HospitalResult | None
    best: HospitalResult | None
    without_auroc: list[str]
    hospitals: int

    @property
    def spread(self) -> float | None:
        """Return best minus worst AUROC (None when no hospital has one)."""
        if self.worst is None or self.best is None:
            return None
        assert self.worst.auroc is not None and self.best.auroc is not None
        return self.best.auroc - self.worst.auroc


def hospital_spread(
    round_number: int, scores: Sequence[HospitalResult]
) -> HospitalSpread:
    """Return the worst and best hospital of one round by AUROC."""
    scored = [s for s in scores if s.auroc is not None]
    return HospitalSpread(
        round_number=round_number,
        worst=min(scored, key=lambda s: s.auroc or 0.0, default=None),
        best=max(scored, key=lambda s: s.auroc or 0.0, default=None),
        without_auroc=[s.identifier for s in scores if s.auroc is None],
        hospitals=len(scores),
    )


@dataclass(frozen=True)
class TestScore(Scores):
    """A run's end-of-run score on the test split (never used for selection)."""

    __test__ = False  # not a test class

    round_number: int
    threshold: float | None


@dataclass(frozen=True)
class RunReport:
    """One run as the reports show it; ``status`` is ``stale`` for dead runs."""

    id: int
    experiment: str
    mode: str
    status: str
    strategy: str | None
    partition: str | None
    rounds_done: int
    rounds_planned: int | None
    duration_s: float | None
    curve: list[CurvePoint]
    columns: dict[str, Any]
    # Per-hospital scores of the global model, by round (federated runs).
    hospitals: dict[int, list[HospitalResult]] = field(default_factory=dict)
    test: TestScore | None = None
    # Cumulative epsilon after each released round (private runs only).
    epsilons: dict[int, float] = field(default_factory=dict)

    @property
    def final_epsilon(self) -> float | None:
        """Return the privacy budget spent by the end (None: not private)."""
        return self.epsilons[max(self.epsilons)] if self.epsilons else None

    @property
    def privacy(self) -> str | None:
        """Return the run's privacy mode, or None for a non-private run."""
        return self.columns.get("privacy")

    @property
    def config(self) -> dict[str, Any]:
        """Return the run's config snapshot (empty when none was stored)."""
        return dict(self.columns.get("config") or {})

    @property
    def best(self) -> CurvePoint | None:
        """Return the round or epoch with the highest validation AUROC."""
        scored = [p for p in self.curve if _number(p.auroc)]
        return max(scored, key=lambda p: p.auroc or 0.0, default=None)

    def best_of(self, key: str) -> CurvePoint | None:
        """Return the round or epoch with the best value of one curve field.

        Lowest for losses (``LOWER_IS_BETTER``), highest otherwise; the first
        such point on ties; None when no point has a number for it.
        """
        scored = [p for p in self.curve if _number(getattr(p, key))]
        if key in LOWER_IS_BETTER:
            return min(scored, key=lambda p: getattr(p, key), default=None)
        return max(scored, key=lambda p: getattr(p, key), default=None)

    @property
    def synthetic(self) -> bool:
        """Return True for a run trained on generated toy data, not X-rays.

        The config's ``synthetic`` flag says so; ``data.path: synthetic`` too,
        for a config stored without the flag.
        """
        config = self.config
        data = config.get("data")
        path = data.get("path") if isinstance(data, Mapping) else None
        return config.get("synthetic") is True or path == "synthetic"

    @property
    def final(self) -> CurvePoint | None:
        """Return the last round or epoch."""
        return self.curve[-1] if self.curve else None

    def lowest_hospital(self, point: CurvePoint | None, key: str) -> float | None:
        """Return the lowest value of a hospital score at a round (None if none).

        Each metric's own worst: the hospital with the lowest accuracy need
        not be the one with the lowest AUROC.
        """
        scores = self.hospitals.get(point.step, []) if point is not None else []
        values = [getattr(s, key) for s in scores if getattr(s, key) is not None]
        return min(values, default=None)

    @property
    def label(self) -> str:
        """Return a legend label such as ``run 3 fedavg dirichlet(alpha=0.5)``."""
        if self.mode != "federated":
            return f"run {self.id} {self.mode}"
        parts = (f"run {self.id}", self.strategy, self.partition)
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class ClientReport:
    """One client of a federated run; losses come from its last local epoch."""

    identifier: str
    partition_id: int | None
    node_id: str | None
    num_examples: int | None
    train_losses: dict[int, float | None]
    val_aurocs: dict[int, float | None]
    failures: int

    @property
    def last_round(self) -> int | None:
        """Return the last round the client trained in."""
        return max(self.train_losses, default=None)


def _number(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _value(value: float | None, is_nan: bool) -> float | None:
    return math.nan if is_nan else value


def load_runs(
    session: Session,
    run_ids: Sequence[int] | None = None,
    *,
    experiment: str | None = None,
) -> list[RunReport]:
    """Return reports of the given runs (in that order) or of all runs by id.

    Raises:
        RunNotFoundError: one of ``run_ids`` has no row.
    """
    stmt = select(Run, Experiment.name).join(Experiment).order_by(Run.id)
    if run_ids is not None:
        stmt = stmt.where(Run.id.in_(run_ids))
    if experiment is not None:
        stmt = stmt.where(Experiment.name == experiment)
    found = {run.id: (run, name) for run, name in session.execute(stmt)}
    if run_ids is not None:
        for run_id in run_ids:
            if run_id not in found:
                raise RunNotFoundError(run_id)
    order = list(run_ids) if run_ids is not None else list(found)
    runs = [found[i][0] for i in dict.fromkeys(order)]
    curves = load_curves(session, runs)
    hospitals = load_hospital_scores(session, [r.id for r in runs])
    tests = load_test_scores(session, [r.id for r in runs])
    epsilons = load_epsilons(session, [r.id for r in runs])
    return [
        _report(
            *found[i],
            curves.get(i, []),
            hospitals=hospitals.get(i, {}),
            test=tests.get(i),
            epsilons=epsilons.get(i, {}),
        )
        for i in order
    ]


def load_epsilons(
    session: Session, run_ids: Sequence[int]
) -> dict[int, dict[int, float]]:
    """Return each private run's cumulative epsilon by round."""
    rows = session.execute(
        select(PrivacySpent.run_id, PrivacySpent.round_number, PrivacySpent.epsilon)
        .where(PrivacySpent.run_id.in_(run_ids))
        .order_by(PrivacySpent.round_number)
    )
    result: dict[int, dict[int, float]] = defaultdict(dict)
    for run_id, round_number, epsilon in rows:
        result[run_id][round_number] = epsilon
    return dict(result)


def _ratio(numerator: int | None, denominator: int) -> float | None:
    return None if numerator is None or denominator <= 0 else numerator / denominator


def _rates(row: Any) -> tuple[float | None, float | None]:
    """Return (sensitivity, specificity) from a row's confusion counts."""
    tp, fn = row.true_positives, row.false_negatives
    tn, fp = row.true_negatives, row.false_positives
    sensitivity = _ratio(tp, (tp or 0) + (fn or 0))
    specificity = _ratio(tn, (tn or 0) + (fp or 0))
    return sensitivity, specificity


def load_hospital_scores(
    session: Session, run_ids: Sequence[int]
) -> dict[int, dict[int, list[HospitalResult]]]:
    """Return each run's per-hospital scores, by round, hospitals in partition order."""
    rows = session.execute(
        select(ClientEvaluation, Client.client_identifier, Client.partition_id)
        .join(Client, ClientEvaluation.client_id == Client.id)
        .where(ClientEvaluation.run_id.in_(run_ids))
        .order_by(
            ClientEvaluation.round_number,
            Client.partition_id,
            Client.client_identifier,
        )
    )
    result: dict[int, dict[int, list[HospitalResult]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for ev, identifier, partition_id in rows:
        sensitivity, specificity = _rates(ev)
        result[ev.run_id][ev.round_number].append(
            HospitalResult(
                identifier=identifier,
                partition_id=partition_id,
                round_number=ev.round_number,
                num_samples=ev.num_samples,
                auroc=ev.auroc,
                accuracy=ev.accuracy,
                f1_score=ev.f1_score,
                sensitivity=sensitivity,
                specificity=specificity,
            )
        )
    return {run_id: dict(rounds) for run_id, rounds in result.items()}


def load_test_scores(session: Session, run_ids: Sequence[int]) -> dict[int, TestScore]:
    """Return each run's end-of-run test score, where it has one."""
    stmt = select(TestEvaluation).where(TestEvaluation.run_id.in_(run_ids))
    scores = {}
    for ev in session.scalars(stmt):
        sensitivity, specificity = _rates(ev)
        scores[ev.run_id] = TestScore(
            round_number=ev.round_number,
            num_samples=ev.num_samples,
            auroc=ev.auroc,
            accuracy=ev.accuracy,
            f1_score=ev.f1_score,
            sensitivity=sensitivity,
            specificity=specificity,
            threshold=ev.threshold,
        )
    return scores


def _report(
    run: Run,
    experiment: str,
    curve: list[CurvePoint],
    *,
    hospitals: dict[int, list[HospitalResult]],
    test: TestScore | None,
    epsilons: dict[int, float],
) -> RunReport:
    stale = is_stale(run)
    if run.end_time is not None:
        end = run.end_time
    else:
        end = (run.heartbeat_at or run.start_time) if stale else datetime.now(UTC)
    done = run.rounds_completed
    if run.training_mode != "federated":
        # Runs recorded before centralized runs kept rounds_completed up to
        # date have 0 there: their epochs with a train loss still count.
        done = max(done, sum(p.train_loss is not None for p in curve))
    return RunReport(
        id=run.id,
        experiment=experiment,
        mode=run.training_mode,
        status=STALE if stale else run.status,
        strategy=run.strategy,
        partition=run.partition,
        rounds_done=done,
        rounds_planned=run.num_rounds,
        duration_s=(end - run.start_time).total_seconds(),
        curve=curve,
        columns=row_dict(run),
        hospitals=hospitals,
        test=test,
        epsilons=epsilons,
    )


def load_curves(session: Session, runs: Iterable[Run]) -> dict[int, list[CurvePoint]]:
    """Return each run's validation curve, ordered by round or epoch.

    Federated: the server's evaluations plus the clients' aggregate train loss.
    Centralized: the ``val_*`` and ``train_loss`` metrics of every epoch.
    """
    runs = list(runs)
    federated = {r.id for r in runs if r.training_mode == "federated"}
    points: dict[int, dict[int, dict[str, Any]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    evaluations = select(ServerEvaluation).where(
        ServerEvaluation.run_id.in_(sorted(federated))
    )
    for ev in session.scalars(evaluations):
        points[ev.run_id][ev.round_number].update(
            {f: getattr(ev, f) for f in CURVE_FIELDS}
        )
    names = [TRAIN_LOSS, *(f"val_{f}" for f in CURVE_FIELDS)]
    rows = session.execute(
        select(
            RunMetric.run_id,
            RunMetric.round_number,
            RunMetric.step,
            RunMetric.metric_name,
            RunMetric.metric_value,
            RunMetric.is_nan,
        ).where(
            RunMetric.run_id.in_([r.id for r in runs]),
            RunMetric.client_id.is_(None),
            RunMetric.metric_name.in_(names),
        )
    )
    for run_id, rnd, step, name, value, is_nan in rows:
        if run_id in federated:
            if rnd is not None and name == TRAIN_LOSS:
                points[run_id][rnd][TRAIN_LOSS] = _value(value, is_nan)
        elif rnd is None:
            key = name if name == TRAIN_LOSS else name.removeprefix("val_")
            points[run_id][step][key] = _value(value, is_nan)
    return {
        run_id: [CurvePoint(step=s, **v) for s, v in sorted(steps.items())]
        for run_id, steps in points.items()
    }


def load_clients(
    session: Session, run_ids: Sequence[int]
) -> dict[int, list[ClientReport]]:
    """Return the clients of each run with their per-round train loss and val AUROC.

    A round's value is that of the client's last local epoch in the round.
    """
    failures = _failure_counts(session, run_ids)
    series: dict[tuple[int, str], dict[int, float | None]] = defaultdict(dict)
    rows = session.execute(
        select(
            RunMetric.client_id,
            RunMetric.metric_name,
            RunMetric.round_number,
            RunMetric.metric_value,
            RunMetric.is_nan,
        )
        .where(
            RunMetric.run_id.in_(run_ids),
            RunMetric.client_id.is_not(None),
            RunMetric.metric_name.in_([TRAIN_LOSS, VAL_AUROC]),
        )
        .order_by(RunMetric.step)
    )
    for client_id, name, rnd, value, is_nan in rows:
        series[client_id, name][rnd] = _value(value, is_nan)
    clients = session.scalars(
        select(Client).where(Client.run_id.in_(run_ids)).order_by(Client.id)
    )
    result: dict[int, list[ClientReport]] = {run_id: [] for run_id in run_ids}
    for c in sorted(
        clients, key=lambda c: (c.partition_id is None, c.partition_id or 0, c.id)
    ):
        result[c.run_id].append(
            ClientReport(
                identifier=c.client_identifier,
                partition_id=c.partition_id,
                node_id=c.node_id,
                num_examples=c.num_examples,
                train_losses=dict(sorted(series[c.id, TRAIN_LOSS].items())),
                val_aurocs=dict(sorted(series[c.id, VAL_AUROC].items())),
                failures=failures[c.run_id, c.client_identifier]
                + failures[c.run_id, c.node_id or ""],
            )
        )
    return result


def _failure_counts(session: Session, run_ids: Sequence[int]) -> dict[Any, int]:
    """Count failures by (run id, client identifier, or node id when unknown)."""
    counts: dict[tuple[int, str], int] = defaultdict(int)
    stmt = select(ClientFailure).where(ClientFailure.run_id.in_(run_ids))
    for failure in session.scalars(stmt):
        counts[failure.run_id, failure.client_identifier or failure.node_id] += 1
    return counts


def load_failures(session: Session, run_id: int) -> list[dict[str, Any]]:
    """Return a run's client failures as rows, by round."""
    stmt = (
        select(ClientFailure)
        .where(ClientFailure.run_id == run_id)
        .order_by(ClientFailure.round_number, ClientFailure.id)
    )
    return [row_dict(f) for f in session.scalars(stmt)]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (``{"a": {"b": 1}}``: ``a.b``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


# Stands for a config key that one run's config does not have.
MISSING: Final = object()


def config_differences(configs: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Return the dotted keys whose values differ between configs, sorted.

    Each key maps to one value per config, ``MISSING`` where a config lacks it.
    """
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    diffs: dict[str, list[Any]] = {}
    for key in keys:
        values = [f.get(key, MISSING) for f in flat]
        if any(v != values[0] or type(v) is not type(values[0]) for v in values[1:]):
            diffs[key] = values
    return diffs
