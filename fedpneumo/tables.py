"""Rich tables of tracked runs, shared by the ``runs`` commands."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedpneumo.reports import (
        ClientReport,
        CurvePoint,
        HospitalResult,
        HospitalSpread,
        RunReport,
    )

# Piped output gets wide tables: a wrapped cell breaks grep and scripts.
PIPE_WIDTH = 200
CURVE_COLUMNS = (
    ("train_loss", "train loss"),
    ("loss", "val loss"),
    ("accuracy", "val accuracy"),
    ("auroc", "val AUROC"),
    ("f1_score", "val F1"),
    ("precision", "val precision"),
    ("recall", "val recall"),
)
# After the mode of a run trained on generated toy data, wherever runs are listed.
SYNTHETIC_TAG = "(synthetic)"


def make_console() -> Console:
    """Return a console for tables; piped output is wide so rows never wrap."""
    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=PIPE_WIDTH)


def fmt_duration(seconds: float | None) -> str:
    """Format seconds as ``12.3s``, ``4m05s`` or ``2h07m``."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


def fmt_rounds(report: RunReport) -> str:
    """Format progress as ``done/planned`` rounds (federated) or epochs."""
    if report.rounds_planned is None:
        return str(report.rounds_done)
    return f"{report.rounds_done}/{report.rounds_planned}"


def mode_cell(report: RunReport) -> str:
    """Return the run's mode, tagged ``(synthetic)`` when it ran on toy data.

    Results on generated images say nothing about X-rays: the tag keeps them
    from passing for real ones in every listing.
    """
    return f"{report.mode} {SYNTHETIC_TAG}" if report.synthetic else report.mode


def data_cell(report: RunReport) -> str:
    """Return where the run's data came from, loudly when it was synthetic."""
    if report.synthetic:
        return "SYNTHETIC: generated toy images, not X-rays"
    config = report.config
    data = config.get("data")
    path = data.get("path") if isinstance(data, dict) else None
    return str(config.get("data_source") or path or "-")


def step_name(report: RunReport) -> str:
    """Return ``round`` for federated runs and ``epoch`` for centralized ones."""
    return "round" if report.mode == "federated" else "epoch"


def point_cell(point: CurvePoint | None, key: str) -> str:
    """Format one metric of a curve point (``-`` when absent)."""
    from fedpneumo.summary import fmt

    return fmt(None if point is None else getattr(point, key))


def details_table(r: RunReport) -> Table:
    """Return the run's columns as a field/value table."""
    c = r.columns
    title = f"run {r.id} (synthetic data)" if r.synthetic else f"run {r.id}"
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    host = f"{c['host']} pid {c['pid']}" if c.get("host") else None
    rows = {
        "experiment": r.experiment,
        "mode": r.mode,
        "status": r.status,
        "strategy": r.strategy,
        "partition": r.partition,
        "data": data_cell(r),
        "seed": c.get("seed"),
        f"{step_name(r)}s": fmt_rounds(r),
        "started": c.get("start_time"),
        "ended": c.get("end_time"),
        "duration": fmt_duration(r.duration_s),
        "flower run id": c.get("flwr_run_id"),
        "host": host,
        "outputs": c.get("outputs_path"),
        "checkpoint": c.get("checkpoint_path"),
        "final model": c.get("final_model_path"),
        "privacy": c.get("privacy") or "none",
        "stopped": c.get("stop_reason"),
        "error": c.get("error_message"),
    }
    for key, value in rows.items():
        table.add_row(key, "-" if value is None else str(value))
    return table


def curve_table(r: RunReport) -> Table:
    """Return validation per round (federated) or per epoch, best marked."""
    title = (
        "server evaluation on val, per round (round 0 = initial model)"
        if r.mode == "federated"
        else "validation per epoch"
    )
    table = Table(title=f"run {r.id}: {title}")
    table.add_column(step_name(r), justify="right")
    for _, header in CURVE_COLUMNS:
        table.add_column(header, justify="right")
    # Marks the round/epoch of the highest val AUROC, the model a run keeps.
    table.add_column("best AUROC")
    private = bool(r.epsilons)
    if private:
        table.add_column("epsilon", justify="right")
    best = r.best
    for p in r.curve:
        cells = [point_cell(p, key) for key, _ in CURVE_COLUMNS]
        cells.append("*" if p is best else "")
        if private:
            cells.append(epsilon_cell(r.epsilons.get(p.step)))
        table.add_row(str(p.step), *cells)
    return table


def epsilon_cell(epsilon: float | None) -> str:
    """Format a spent privacy budget (``-`` where none was spent)."""
    return "-" if epsilon is None else f"{epsilon:.4g}"


def privacy_line(r: RunReport) -> str | None:
    """Return the run's final epsilon and delta, or None for a non-private run."""
    if not r.privacy:
        return None
    delta = (r.config.get("privacy") or {}).get("delta")
    if r.final_epsilon is None:
        return f"privacy: {r.privacy}, no round released yet (delta {delta})"
    return (
        f"privacy: {r.privacy}, final epsilon {r.final_epsilon:.4g} at delta "
        f"{delta} after {len(r.epsilons)} released rounds (client-level, "
        "add-or-remove-one neighbours, no amplification by sampling)"
    )


def clients_table(clients: list[ClientReport]) -> Table:
    """Return one row per client: data, rounds trained, last loss and AUROC."""
    from fedpneumo.summary import fmt

    table = Table(title="clients (train loss and val AUROC: last local epoch)")
    table.add_column("client")
    for name in ("partition", "examples", "rounds trained", "last round"):
        table.add_column(name, justify="right")
    for name in ("train loss", "val AUROC", "failures"):
        table.add_column(name, justify="right")
    for c in clients:
        last = c.last_round
        table.add_row(
            c.identifier,
            fmt(c.partition_id),
            fmt(c.num_examples),
            str(len(c.train_losses)),
            fmt(last),
            fmt(c.train_losses.get(last) if last is not None else None),
            fmt(c.val_aurocs.get(last) if last is not None else None),
            str(c.failures),
        )
    return table


def failures_table(failures: list[dict[str, Any]]) -> Table:
    """Return one row per client failure with its reason."""
    table = Table(title=f"client failures: {len(failures)}")
    for name in ("round", "client", "node id", "reason"):
        table.add_column(name)
    for f in failures:
        table.add_row(
            str(f["round_number"]),
            f["client_identifier"] or "-",
            f["node_id"],
            f["reason"],
        )
    return table


# Shown instead of a number where a hospital's slice holds one class.
NO_AUROC = "n/a (one class)"


def auroc_cell(value: float | None) -> str:
    """Format a hospital's AUROC; a missing one is undefined, never 0."""
    from fedpneumo.summary import fmt

    return NO_AUROC if value is None else fmt(value)


def hospitals_table(
    run_id: int, round_number: int, what: str, scores: list[HospitalResult]
) -> Table:
    """Return one row per hospital: its score of one round's global model."""
    from fedpneumo.summary import fmt

    table = Table(
        title=f"run {run_id}: hospitals' scores of the {what} global model "
        f"(round {round_number}, each on its held-out slice, server's val threshold)"
    )
    table.add_column("hospital")
    for name in ("samples", "AUROC", "accuracy", "F1", "sensitivity", "specificity"):
        table.add_column(name, justify="right")
    for h in scores:
        table.add_row(
            h.identifier,
            fmt(h.num_samples),
            auroc_cell(h.auroc),
            fmt(h.accuracy),
            fmt(h.f1_score),
            fmt(h.sensitivity),
            fmt(h.specificity),
        )
    return table


def spread_line(spread: HospitalSpread) -> str:
    """Return the worst-hospital line: who, its AUROC, and best minus worst."""
    from fedpneumo.summary import fmt

    without = ""
    if spread.without_auroc:
        without = (
            f"; no AUROC for {', '.join(spread.without_auroc)} "
            "(a one-class slice: undefined, not 0)"
        )
    if spread.worst is None or spread.best is None:
        return (
            f"worst hospital (round {spread.round_number}): none has an AUROC" + without
        )
    scored = spread.hospitals - len(spread.without_auroc)
    return (
        f"worst hospital (round {spread.round_number}): {spread.worst.identifier} "
        f"AUROC {fmt(spread.worst.auroc)}; spread (best - worst) "
        f"{fmt(spread.spread)} over {scored} hospital{'s' * (scored != 1)} with an "
        "AUROC" + without
    )


# Printed for a finished run without a test score: its data had no test split.
NO_TEST_CLAIM = "test: the data has no test split; nothing is claimed about test"
# A run that did not finish has no test score whatever its data holds.
NOT_YET = {
    "in_progress": "test: not scored yet (once, after the last round)",
    "failed": "test: not scored (the run did not finish); nothing is claimed",
    "stale": "test: not scored (the run did not finish); nothing is claimed",
}


def test_line(report: RunReport) -> str:
    """Return the end-of-run test score line, labelled as test."""
    from fedpneumo.summary import fmt

    t = report.test
    if t is None:
        return NOT_YET.get(report.status, NO_TEST_CLAIM)
    return (
        f"test (scored once after training, never used for selection; model of "
        f"{step_name(report)} {t.round_number}, val threshold {fmt(t.threshold)}): "
        f"AUROC {fmt(t.auroc)}, accuracy {fmt(t.accuracy)}, F1 {fmt(t.f1_score)}, "
        f"sensitivity {fmt(t.sensitivity)}, specificity {fmt(t.specificity)} "
        f"on {fmt(t.num_samples)} images"
    )
