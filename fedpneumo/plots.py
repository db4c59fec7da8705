"""Learning-curve figures of tracked runs.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so no
global backend state is touched and nothing needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fedpneumo.reports import ClientReport, RunReport

# Fixed size and resolution: the PNG is always 1200 x 800 pixels.
FIGSIZE_IN = (12.0, 8.0)
DPI = 100
# (curve field, panel title, y label, bounds of the metric or None)
SERVER_PANELS = (
    ("auroc", "Validation AUROC (higher is better)", "val AUROC", (0.0, 1.0)),
    ("accuracy", "Validation accuracy", "val accuracy", (0.0, 1.0)),
    ("loss", "Validation loss (lower is better)", "val BCE loss", None),
)
CLIENT_PANEL_TITLE = "Train loss: thin = one client, dashed = centralized"
CLIENT_PANEL_YLABEL = "train BCE loss (last local epoch)"


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


def make_figure(
    runs: Sequence[RunReport], clients: Mapping[int, Sequence[ClientReport]]
) -> Figure:
    """Draw val AUROC, accuracy, loss and client train loss of runs on shared axes."""
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    _draw_server_panels(axes[:3], runs)
    _draw_client_panel(axes[3], runs, clients)
    for ax in axes:
        ax.tick_params(labelbottom=True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(x_label(runs))
    handles = [
        Line2D([], [], color=f"C{i % 10}", linestyle=_style(r), marker="o")
        for i, r in enumerate(runs)
    ]
    labels = [r.label + ("" if r.mode == "federated" else " (epochs)") for r in runs]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 3))
    ids = ", ".join(str(r.id) for r in runs)
    fig.suptitle(f"fedpneumo learning curves: run{'s' * (len(runs) > 1)} {ids}")
    return fig


def plot_runs(
    runs: Sequence[RunReport],
    clients: Mapping[int, Sequence[ClientReport]],
    path: Path,
) -> None:
    """Write the learning curves of runs to an image file (PNG: 1200x800 px)."""
    make_figure(runs, clients).savefig(path, dpi=DPI)
