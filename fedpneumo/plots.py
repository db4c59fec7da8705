"""Learning-curve figures of tracked runs.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no
global backend state is touched and nothing needs a display.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fedpneumo.output_files import check_output_folder, write_atomically
from fedpneumo.reports import MISSING, ClientReport, RunReport, config_differences
from persistence.errors import InputError

# Fixed size and resolution: the PNG is always 1200 x 1100 pixels.
FIGSIZE_IN = (12.0, 11.0)
DPI = 100
# (curve field, panel title, y label, bounds of the metric or None)
SERVER_PANELS = (
    ("auroc", "Validation AUROC (higher is better)", "val AUROC", (0.0, 1.0)),
    ("accuracy", "Validation accuracy", "val accuracy", (0.0, 1.0)),
    ("loss", "Validation loss (lower is better)", "val BCE loss", None),
)
CLIENT_PANEL_TITLE = "Train loss: thin = one client, dashed = centralized"
CLIENT_PANEL_YLABEL = "train BCE loss (last local epoch)"
HOSPITAL_PANEL_TITLE = "Each hospital's AUROC (own held-out slice; gap = one class)"
# Config keys left out of the legend: bookkeeping that does not change the
# model, or facts the label already states (strategy, partition, synthetic).
LEGEND_SKIPPED_KEYS = (
    "outputs_dir",
    "db.",
    "tracking.",
    "synthetic",
    "data_source",
    "strategy.name",
    "partition.name",
    "partition.alpha",
    "partition.classes_per_client",
)
LEGEND_MAX_KEYS = 4
LEGEND_MAX_VALUE_CHARS = 16


def plot_formats() -> list[str]:
    """Return the file extensions ``runs plot`` can write (Agg's savefig formats).

    PGF is left out unless its TeX program is installed: without it matplotlib
    fails halfway through the file.
    """
    formats = set(FigureCanvasAgg(Figure()).get_supported_filetypes())
    if not shutil.which(str(rcParams["pgf.texsystem"])):
        formats.discard("pgf")
    return sorted(formats)


def check_plot_path(path: Path) -> str:
    """Return the image format of ``path`` from its extension, checked early.

    Raises:
        InputError: an extension savefig cannot write, or its folder is missing.
    """
    fmt = path.suffix.lower().removeprefix(".")
    formats = plot_formats()
    if fmt not in formats:
        given = f"extension .{fmt}" if fmt else "no extension"
        raise InputError(
            f"--output {path} has {given}; use one of "
            + ", ".join(f".{f}" for f in formats)
        )
    check_output_folder(path)
    return fmt


def x_label(runs: Sequence[RunReport]) -> str:
    """Return the x label: ``round``, ``epoch`` or ``round / epoch`` when mixed."""
    modes = {r.mode == "federated" for r in runs}
    if modes == {True}:
        return "round"
    if modes == {False}:
        return "epoch"
    return "round / epoch"


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _style(run: RunReport) -> str:
    return "-" if run.mode == "federated" else "--"


def _draw_server_panels(axes: Sequence[Axes], runs: Sequence[RunReport]) -> None:
    for ax, (field, title, ylabel, bounds) in zip(axes, SERVER_PANELS, strict=True):
        seen: list[float] = []
        for i, run in enumerate(runs):
            steps = [p.step for p in run.curve]
            values = [_nan(getattr(p, field)) for p in run.curve]
            seen += [v for v in values if math.isfinite(v)]
            ax.plot(
                steps,
                values,
                color=f"C{i % 10}",
                linestyle=_style(run),
                marker="o",
                markersize=3,
                linewidth=1.8,
            )
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if bounds is not None and seen:
            # Zoom to the data (good runs differ in the last percent) but never
            # past the metric's own bounds.
            low, high = max(bounds[0], min(seen)), min(bounds[1], max(seen))
            pad = max((high - low) * 0.05, 0.005)
            ax.set_ylim(max(bounds[0], low - pad), min(bounds[1], high) + pad)


def _draw_client_panel(
    ax: Axes,
    runs: Sequence[RunReport],
    clients: Mapping[int, Sequence[ClientReport]],
) -> None:
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if run.mode != "federated":
            steps = [p.step for p in run.curve]
            losses = [_nan(p.train_loss) for p in run.curve]
            ax.plot(steps, losses, color=color, linestyle="--", linewidth=1.8)
            continue
        for client in clients.get(run.id, ()):
            rounds = list(client.train_losses)
            losses = [_nan(v) for v in client.train_losses.values()]
            ax.plot(rounds, losses, color=color, linewidth=0.9, alpha=0.45, marker=".")
    ax.set_title(CLIENT_PANEL_TITLE)
    ax.set_ylabel(CLIENT_PANEL_YLABEL)


def _draw_hospital_panel(ax: Axes, runs: Sequence[RunReport]) -> None:
    for i, run in enumerate(runs):
        by_hospital: dict[str, dict[int, float]] = {}
        for step, scores in sorted(run.hospitals.items()):
            for score in scores:
                by_hospital.setdefault(score.identifier, {})[step] = _nan(score.auroc)
        for values in by_hospital.values():
            ax.plot(
                list(values),
                list(values.values()),
                color=f"C{i % 10}",
                linewidth=0.9,
                alpha=0.6,
                marker=".",
            )
    if not any(run.hospitals for run in runs):
        ax.text(
            0.5,
            0.5,
            "no per-hospital evaluation recorded",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_title(HOSPITAL_PANEL_TITLE, fontsize="medium")
    ax.set_ylabel("hospital AUROC")


def _draw_privacy_panel(ax: Axes, runs: Sequence[RunReport]) -> None:
    """Val AUROC of each released round against the epsilon spent by then.

    Its x axis is epsilon, not rounds: the shared axis is swapped for its own.
    """
    figure = ax.figure
    ax.remove()
    ax = figure.add_subplot(3, 2, 6)
    for i, run in enumerate(runs):
        points = [(e, p.auroc) for p in run.curve if (e := run.epsilons.get(p.step))]
        if points:
            ax.plot(
                [e for e, _ in points],
                [_nan(a) for _, a in points],
                color=f"C{i % 10}",
                marker="o",
                markersize=3,
                linewidth=1.8,
            )
    ax.set_title("Validation AUROC against privacy spent (epsilon)")
    ax.set_xlabel("epsilon (cumulative, at the run's delta)")
    ax.set_ylabel("val AUROC")
    ax.grid(True, alpha=0.3)


def make_figure(
    runs: Sequence[RunReport], clients: Mapping[int, Sequence[ClientReport]]
) -> Figure:
    """Draw val AUROC, accuracy, loss, client train loss and hospital AUROC of runs."""
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2, sharex=True).ravel()
    _draw_server_panels(axes[:3], runs)
    _draw_client_panel(axes[3], runs, clients)
    _draw_hospital_panel(axes[4], runs)
    private = [r for r in runs if r.epsilons]
    if private:
        _draw_privacy_panel(axes[5], runs)
    else:
        axes[5].set_visible(False)
    for ax in axes[:5]:
        ax.tick_params(labelbottom=True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(x_label(runs))
    handles = [
        Line2D([], [], color=f"C{i % 10}", linestyle=_style(r), marker="o")
        for i, r in enumerate(runs)
    ]
    labels = legend_labels(runs)
    # Long labels (config differences) get fewer columns so they fit the width.
    longest = max((len(label) for label in labels), default=1)
    ncols = max(1, min(len(runs), 3, 150 // (longest + 6)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols)
    ids = ", ".join(str(r.id) for r in runs)
    fig.suptitle(f"fedpneumo learning curves: run{'s' * (len(runs) > 1)} {ids}")
    return fig


def _legend_value(value: Any) -> str:
    if value is MISSING:
        return "-"
    text = str(value)
    if "/" in text:
        text = Path(text).name or text  # a path: its last part tells runs apart
    if len(text) > LEGEND_MAX_VALUE_CHARS:
        text = text[: LEGEND_MAX_VALUE_CHARS - 1] + "\u2026"
    return text


def legend_labels(runs: Sequence[RunReport]) -> list[str]:
    """Return one legend label per run: id, setup, data tag, config differences.

    Only the config keys whose values differ between the plotted runs are
    shown, at most ``LEGEND_MAX_KEYS`` of them, so that two runs with the same
    strategy and partition can still be told apart.
    """
    diffs = {
        key: values
        for key, values in config_differences([r.config for r in runs]).items()
        if not key.startswith(LEGEND_SKIPPED_KEYS)
    }
    labels = []
    for i, run in enumerate(runs):
        label = run.label + ("" if run.mode == "federated" else " (epochs)")
        if run.synthetic:
            label += " (synthetic)"
        shown = [f"{k}={_legend_value(v[i])}" for k, v in diffs.items()]
        if len(shown) > LEGEND_MAX_KEYS:
            more = len(shown) - LEGEND_MAX_KEYS + 1
            shown = [*shown[: LEGEND_MAX_KEYS - 1], f"+{more} more"]
        labels.append(label + (": " + ", ".join(shown) if shown else ""))
    return labels


def plot_runs(
    runs: Sequence[RunReport],
    clients: Mapping[int, Sequence[ClientReport]],
    path: Path,
) -> None:
    """Write the learning curves of runs to an image file (PNG: 1200x1100 px).

    The format follows the extension (``plot_formats``); a file that cannot
    be written raises InputError and leaves no partial file.
    """
    fmt = check_plot_path(path)
    figure = make_figure(runs, clients)
    write_atomically(path, lambda fh: figure.savefig(fh, format=fmt, dpi=DPI))
