"""Benchmark 1: the federated simulation with database persistence on and off.

Alternates the two settings several times on one machine and reports the ratio
of steady-state round times (persistence on / off). Target: <= 1.03.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

from benchmarks.common import (
    federated_session,
    round_seconds,
    save_result,
    summarize,
    target,
)

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and save its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks tracking_overhead")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            for enabled in (True, False) if repeat % 2 == 0 else (False, True):
                outcome = federated_session(
                    [
                        f"data.path={args.data}",
                        f"num_rounds={args.rounds}",
                        f"simulation.num_supernodes={args.clients}",
                        f"tracking.enable_db={str(enabled).lower()}",
                        f"outputs_dir={out}",
                        "experiment_name=bench-tracking",
                    ]
                )
                rounds = round_seconds(outcome.round_times)
                times[enabled].append(statistics.median(rounds))
                log.info("persistence=%s: %.2f s/round", enabled, times[enabled][-1])
    ratios = [on / off for on, off in zip(times[True], times[False], strict=True)]
    figures = {
        "round_seconds_persistence_on": summarize(times[True]),
        "round_seconds_persistence_off": summarize(times[False]),
        "ratio_on_off": summarize(ratios),
        "config": f"{args.clients} clients, {args.rounds} rounds, full data, "
        "cnn, 1 local epoch; rounds after the first",
    }
    ratio = statistics.median(ratios)
    save_result(
        "tracking_overhead",
        figures,
        [target("wall-time ratio persistence on/off", ratio, "<=", 1.03)],
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
