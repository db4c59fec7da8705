"""Render BENCHMARKS.md from the result files the benchmarks wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR

OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
# Result files, in the order BENCHMARKS.md shows them (a benchmark run with
# --device cuda writes its own file, such as trainer_overhead_gpu).
SECTIONS = (
    "trainer_overhead",
    "trainer_overhead_gpu",
    "peer_overhead",
    "tracking_overhead",
    "framework_overhead",
    "write_throughput",
    "scale",
    "quality",
    "gpu",
)
# The benchmark modules, in the order `python -m benchmarks all` runs them.
BENCHMARKS = tuple(name for name in SECTIONS if not name.endswith("_gpu"))
TITLES = {
    "trainer_overhead": "0. Trainer overhead vs a minimal PyTorch loop (CPU)",
    "trainer_overhead_gpu": "0b. Trainer overhead vs a minimal PyTorch loop (GPU)",
    "peer_overhead": "0c. fedpneumo run vs a minimal Flower app without tracking",
    "tracking_overhead": "1. Tracking overhead",
    "framework_overhead": "2. Framework overhead vs centralized",
    "write_throughput": "3. Write throughput",
    "scale": "4. Scale to 1000 clients",
    "quality": "5. Model quality on PneumoniaMNIST",
    "gpu": "6. GPU",
}


def num(value: Any) -> str:
    """Format a figure compactly."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def spread(stats: dict[str, Any]) -> str:
    """Median (min-max, n) of a summary."""
    return (
        f"{num(stats['median'])} ({num(stats['min'])}-{num(stats['max'])}, "
        f"n={stats['n']})"
    )


def figures_table(figures: dict[str, Any], prefix: str = "") -> list[str]:
    """Flatten figures into table rows."""
    rows = []
    for key, value in figures.items():
        if key in ("config", "table", "privacy_table"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and {"median", "min", "max"} <= value.keys():
            rows.append(f"| {name} | {spread(value)} |")
        elif isinstance(value, dict):
            rows += figures_table(value, prefix=f"{name} / ")
        else:
            rows.append(f"| {name} | {num(value)} |")
    return rows


def worst_cell(row: dict[str, Any]) -> str:
    """The worst hospital's val AUROC at the best round, and who it is."""
    if "worst_hospital_val_auroc" not in row:
        return "-"  # centralized: there are no hospitals
    cell = f"{num(row['worst_hospital_val_auroc'])} ({row['worst_hospital']})"
    if row.get("hospitals_without_auroc"):
        cell += f"; {row['hospitals_without_auroc']} one-class slices"
    return cell


def quality_table(table: dict[str, dict[str, Any]]) -> list[str]:
    """The quality matrix as a Markdown table."""
    has_test = any("test_auroc" in row for row in table.values())
    head = (
        "| configuration | overrides on the preset | client train images "
        "| run | best round | val AUROC | val accuracy | worst hospital val AUROC |"
    )
    sep = "|---|---|---|---|---|---|---|---|"
    if has_test:
        head += " test AUROC | test accuracy |"
        sep += "---|---|"
    lines = [head, sep]
    for name, row in table.items():
        overrides = " ".join(f"`{o}`" for o in row.get("overrides", [])) or "-"
        sizes = row.get("client_train_images")
        sizes = ", ".join(map(str, sizes)) if sizes else "-"
        line = (
            f"| {name} | {overrides} | {sizes} | {row['run_id']} | "
            f"{row['best_round']} | "
            f"{num(row['val_auroc'])} | {num(row['val_accuracy'])} | "
            f"{worst_cell(row)} |"
        )
        if has_test:
            line += f" {num(row.get('test_auroc'))} | {num(row.get('test_accuracy'))} |"
        lines.append(line)
    return lines


def privacy_table(table: dict[str, dict[str, Any]]) -> list[str]:
    """The privacy/utility sweep as a Markdown table."""
    lines = [
        "| privacy | overrides on the preset | run | final epsilon (delta) "
        "| best round | best val AUROC | val accuracy | worst hospital val AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        overrides = " ".join(f"`{o}`" for o in row.get("overrides", []))
        epsilon = (
            "-"
            if row.get("final_epsilon") is None
            else f"{row['final_epsilon']:.3g} ({row['delta']:g})"
        )
        lines.append(
            f"| {name} | {overrides} | {row['run_id']} | {epsilon} | "
            f"{row['best_round']} | {num(row['val_auroc'])} | "
            f"{num(row['val_accuracy'])} | {worst_cell(row)} |"
        )
    return lines


def section(result: dict[str, Any]) -> list[str]:
    """One benchmark's section."""
    m = result["machine"]
    lines = [
        f"## {TITLES.get(result['name'], result['name'])}",
        "",
        f"- command: `{result['command'].strip()}`",
        f"- date: {result['date']}",
        f"- machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; Python {m['python']}, torch {m['torch']}",
        f"- setup: {result['figures'].get('config', '')}",
        "",
    ]
    if "table" in result["figures"]:
        lines += quality_table(result["figures"]["table"]) + [""]
    if "privacy_table" in result["figures"]:
        lines += privacy_table(result["figures"]["privacy_table"]) + [""]
    rows = figures_table(result["figures"])
    if rows:
        lines += ["| figure | value: median (min-max, n) |", "|---|---|", *rows, ""]
    for t in result["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(
            f"- target: {t['what']} {t['op']} {num(t['goal'])} {t['unit']}: "
            f"measured {num(t['value'])} {t['unit']}: **{verdict}**"
        )
    if result.get("notes"):
        lines += ["", result["notes"]]
    return [*lines, ""]


def render() -> str:
    """Return BENCHMARKS.md's text."""
    lines = [
        "# Benchmarks",
        "",
        "Every figure below was written by the committed scripts in `benchmarks/`",
        "(`make bench` runs them all; `python -m benchmarks NAME` runs one) into",
        "`benchmarks/results/*.json`, and this page is rendered from those files by",
        "`python -m benchmarks report`. Timings are medians of repeats with min-max;",
        "ratios are measured inside one run, alternating the settings compared.",
        "",
    ]
    for name in SECTIONS:
        path = RESULTS_DIR / f"{name}.json"
        if path.exists():
            lines += section(json.loads(path.read_text()))
        else:
            lines += [f"## {TITLES[name]}", "", "Not run yet.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Write BENCHMARKS.md."""
    OUTPUT.write_text(render())
    return {"written": str(OUTPUT)}


if __name__ == "__main__":
    main()
