"""Shared pieces of the benchmarks: machine facts, statistics, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Describe this machine: cores, memory, CPU and GPU model, software."""
    import torch

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        memory_gib = round(kib / 2**20, 1)
    return {
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return median, min, max and count of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def save_result(
    name: str,
    figures: dict[str, Any],
    targets: list[dict[str, Any]],
    notes: str = "",
    argv: Sequence[str] | None = None,
) -> Path:
    """Write a benchmark's figures, with the command and machine, as JSON."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {
        "name": name,
        "command": " ".join(["python -m benchmarks", name, *(argv or [])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "figures": figures,
        "targets": targets,
        "notes": notes,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def target(
    what: str, value: float, op: str, goal: float, unit: str = ""
) -> dict[str, Any]:
    """Describe a target and whether the measured value meets it."""
    met = value <= goal if op == "<=" else value >= goal
    return {
        "what": what,
        "value": value,
        "op": op,
        "goal": goal,
        "unit": unit,
        "met": bool(met),
    }


def federated_session(overrides: list[str], env: dict[str, str] | None = None) -> Any:
    """Run one `fedpneumo run` session in this process; return its outcome."""
    from fedpneumo.federated import launch, new_session_config, prepare
    from fedpneumo.launcher import LocalSuperLink, launch_env
    from server_app.compose import load_config, resolve_paths

    cfg = resolve_paths(load_config(overrides))
    url = prepare(cfg)
    launch_vars = {**launch_env(url, cfg.simulation.ray_address), **(env or {})}
    with LocalSuperLink(launch_vars, Path.cwd()) as superlink:
        outcome = launch(cfg, url, new_session_config(cfg), superlink=superlink)
    if not outcome.flower.completed:
        raise RuntimeError(
            f"benchmark run failed: {outcome.flower.status} {outcome.flower.details}"
        )
    return outcome


def round_seconds(
    round_times: dict[int, float], skip_first: bool = True
) -> list[float]:
    """Per-round durations from the times rounds were reported (steady state)."""
    rounds = sorted(round_times)
    durations = [
        round_times[b] - round_times[a]
        for a, b in zip(rounds, rounds[1:], strict=False)
    ]
    return durations[1:] if skip_first and len(durations) > 1 else durations
