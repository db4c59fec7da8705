"""Benchmark 6: the default federated simulation and centralized training on CUDA.

Measures, on one machine, the steady-state federated round (clients sharing the
GPU through Ray's client GPU fractions) and the centralized epoch, on CUDA and
on the CPU, and reports the speed-ups. Without a GPU it says so and records the
CPU figures only.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

from benchmarks.common import federated_session, round_seconds, save_result, summarize
from benchmarks.framework_overhead import centralized_epochs

log = logging.getLogger(__name__)


def federated_round_seconds(data: str, rounds: int, out: str, gpu: bool) -> dict:
    """Steady-state round seconds and start-up of the default simulation."""
    device = (
        [
            "train.device=cuda",
            "simulation.client_num_gpus=0.1",
        ]
        if gpu
        else ["train.device=cpu", "simulation.client_num_gpus=0.0"]
    )
    outcome = federated_session(
        [
            f"data.path={data}",
            f"num_rounds={rounds}",
            f"outputs_dir={out}",
            "experiment_name=bench-gpu",
            *device,
        ]
    )
    return {
        "round_seconds": summarize(round_seconds(outcome.round_times)),
        "startup_seconds": outcome.round_times[0],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and save its figures."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        log.warning("no CUDA GPU here: recording the CPU figures only")
    figures: dict = {"gpu_available": gpu}
    with tempfile.TemporaryDirectory() as out:
        devices = (["cuda"] if gpu else []) + ([] if args.skip_cpu else ["cpu"])
        for device in devices:
            epochs, _ = centralized_epochs(args.data, args.epochs, out, device=device)
            figures[device] = {
                "centralized_epoch_seconds": summarize(epochs),
                "federated": federated_round_seconds(
                    args.data, args.rounds, out, gpu=device == "cuda"
                ),
            }
    if gpu and "cpu" in figures:
        cpu, cuda = figures["cpu"], figures["cuda"]
        figures["speedup_centralized_epoch"] = (
            cpu["centralized_epoch_seconds"]["median"]
            / cuda["centralized_epoch_seconds"]["median"]
        )
        figures["speedup_federated_round"] = (
            cpu["federated"]["round_seconds"]["median"]
            / cuda["federated"]["round_seconds"]["median"]
        )
    figures["config"] = (
        f"default simulation (10 clients, Dirichlet 0.5, FedAvg, cnn, full data), "
        f"{args.rounds} rounds and {args.epochs} centralized epochs, the first "
        "excluded; on CUDA each client asks Ray for 0.1 GPU"
    )
    save_result(
        "gpu",
        figures,
        [],
        notes="" if gpu else "No CUDA GPU on this machine.",
        argv=argv,
    )
    log.info("%s", {k: v for k, v in figures.items() if k.startswith("speedup")})
    return figures


if __name__ == "__main__":
    main()
