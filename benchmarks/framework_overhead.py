"""Benchmark 2: one federated round against one centralized epoch.

All clients train one local epoch per round, so a round and an epoch see the
same images with the same model. Steady state excludes the first round/epoch;
the run's start-up (SuperLink, Ray, first evaluation) is reported separately.
Target: round/epoch <= 1.1 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from benchmarks.common import (
    federated_session,
    round_seconds,
    save_result,
    summarize,
    target,
)


def centralized_epochs(
    data: str, epochs: int, out: str, device: str = "auto"
) -> tuple[list[float], float]:
    """Return steady-state epoch seconds and the start-up seconds of training."""
    from fedpneumo.centralized import run_centralized
    from server_app.compose import load_config, resolve_paths
    from server_app.factories import centralized_input

    started = time.monotonic()
    cfg = resolve_paths(
        load_config(
            [
                f"data.path={data}",
                f"train.epochs={epochs}",
                f"outputs_dir={out}",
                f"train.device={device}",
                "experiment_name=bench-framework",
            ]
        )
    )
    result = run_centralized(cfg, *centralized_input(cfg))
    total = time.monotonic() - started
    seconds = [h["epoch_seconds"] for h in result.fit.history]
    return seconds[1:], total - sum(seconds)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and save its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks framework_overhead")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    rounds, epochs, startups, central_startups = [], [], [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            outcome = federated_session(
                [
                    f"data.path={args.data}",
                    f"num_rounds={args.rounds}",
                    f"simulation.num_supernodes={args.clients}",
                    "partition=iid",
                    f"outputs_dir={out}",
                    "experiment_name=bench-framework",
                ]
            )
            rounds += round_seconds(outcome.round_times)
            startups.append(outcome.round_times[0])
            seconds, startup = centralized_epochs(args.data, args.rounds, out)
            epochs += seconds
            central_startups.append(startup)
    ratio = statistics.median(rounds) / statistics.median(epochs)
    figures = {
        "federated_round_seconds": summarize(rounds),
        "centralized_epoch_seconds": summarize(epochs),
        "ratio_round_epoch": ratio,
        "federated_startup_seconds": summarize(startups),
        "centralized_startup_seconds": summarize(central_startups),
        "config": f"{args.clients} clients (IID), 1 local epoch, cnn, full data; "
        f"{args.rounds} rounds/epochs, the first excluded",
    }
    save_result(
        "framework_overhead",
        figures,
        [target("federated round / centralized epoch", ratio, "<=", 1.1)],
        notes="Start-up counts from `fedpneumo run` submitting the app to the "
        "initial model's evaluation (SuperLink, Ray, data loading).",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
