"""Benchmark: `fedpneumo run` against a minimal Flower app that tracks nothing.

The peer (``benchmarks/peer_app``) trains the same small CNN with FedAvg on
the same data, Dirichlet(0.5) partition, clients and rounds, with one local
epoch of a plain PyTorch loop, each client scoring the global model on its
held-out slice and the server scoring it on val, as fedpneumo does. It keeps
nothing: no database, files or checkpoints. fedpneumo runs with its defaults
(SQLite tracking, fsync on) except augmentation, which the peer does not do.

Each side runs as its own command, from process start to exit, on a private
SuperLink started the same way, alternating. Steady round time: the time
between consecutive server evaluations after the first round (fedpneumo's
from ``server_evaluations.evaluation_time``, the peer's from the time its
ServerApp prints). Target: whole-run wall fedpneumo / peer <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import save_result, summarize, target

PEER_APP = Path(__file__).resolve().parent / "peer_app"
ROUND_LINE = "peer-round "


def round_breakdown(url: str, run_id: int, slots: int) -> dict[str, list[float]]:
    """Where each round's time went, from the run's own rows.

    Client training is the clients' summed epoch seconds over the Ray slots
    that ran them side by side; server evaluation is its eval_seconds; the
    rest is Flower's messaging, the hospitals' evaluation and tracking.
    """
    from sqlalchemy import func, select

    from persistence.db import get_engine, session_scope
    from persistence.models import RunMetric, ServerEvaluation

    with session_scope(get_engine(url)) as db:
        train = dict(
            db.execute(
                select(RunMetric.round_number, func.sum(RunMetric.metric_value))
                .where(
                    RunMetric.run_id == run_id,
                    RunMetric.client_id.is_not(None),
                    RunMetric.metric_name == "epoch_seconds",
                )
                .group_by(RunMetric.round_number)
            ).all()
        )
        evals = db.execute(
            select(
                ServerEvaluation.round_number,
                ServerEvaluation.eval_seconds,
                ServerEvaluation.evaluation_time,
            )
            .where(ServerEvaluation.run_id == run_id)
            .order_by(ServerEvaluation.round_number)
        ).all()
    parts: dict[str, list[float]] = {"client_training": [], "server_evaluation": []}
    parts["messaging_hospital_evaluation_tracking"] = []
    # Steady rounds: from round 2 on (round 1 includes the clients' start-up).
    for before, now in zip(evals[1:], evals[2:], strict=False):
        wall = (now.evaluation_time - before.evaluation_time).total_seconds()
        training = train.get(now.round_number, 0.0) / slots
        parts["client_training"].append(training)
        parts["server_evaluation"].append(now.eval_seconds or 0.0)
        parts["messaging_hospital_evaluation_tracking"].append(
            wall - training - (now.eval_seconds or 0.0)
        )
    return parts


def run_fedpneumo(
    data: str, rounds: int, clients: int, out: Path
) -> tuple[float, list[float], dict[str, list[float]]]:
    """Run `fedpneumo run`; return wall seconds, steady rounds and their parts."""
    from sqlalchemy import select

    from persistence.db import dispose_engines, get_engine, session_scope
    from persistence.models import Run, ServerEvaluation

    args = [
        f"data.path={data}",
        f"num_rounds={rounds}",
        f"simulation.num_supernodes={clients}",
        "data.augment=false",
        f"outputs_dir={out}",
        "experiment_name=bench-peer",
    ]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedpneumo", "run", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"fedpneumo run failed: {done.stderr[-2000:]}")
    url = f"sqlite:///{out / 'fedpneumo.db'}"
    with session_scope(get_engine(url)) as db:
        run_id = db.scalar(select(Run.id).order_by(Run.id.desc()))
        stamps = db.scalars(
            select(ServerEvaluation.evaluation_time)
            .where(ServerEvaluation.run_id == run_id)
            .order_by(ServerEvaluation.round_number)
        ).all()
    # One Ray slot per CPU core: simulation.client_num_cpus is 1.
    parts = round_breakdown(url, run_id, os.cpu_count() or 1)
    dispose_engines()
    times = [t.timestamp() for t in stamps]
    return wall, steady(times), parts


def run_peer(data: str, rounds: int, clients: int) -> tuple[float, list[float]]:
    """Run the peer app on its own SuperLink; return wall and round seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.peer_overhead",
            "peer",
            "--data",
            data,
            "--rounds",
            str(rounds),
            "--clients",
            str(clients),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"peer app failed: {done.stdout[-2000:]} {done.stderr[-2000:]}"
        )
    times = [
        float(line.split()[-1])
        for line in done.stdout.splitlines()
        if ROUND_LINE in line
    ]
    return wall, steady(times)


def steady(times: list[float]) -> list[float]:
    """Round durations from round-end times (round 0 first), after round 1."""
    durations = [b - a for a, b in zip(times, times[1:], strict=False)]
    return durations[1:]


def peer_command(data: str, rounds: int, clients: int) -> int:
    """The peer's whole command: a private SuperLink, `flwr run`, its status."""
    from fedpneumo.launcher import LocalSuperLink

    with LocalSuperLink(dict(os.environ), Path.cwd(), PEER_APP) as superlink:
        outcome = superlink.submit(
            {"data-path": data, "num-rounds": rounds, "num-clients": clients},
            f"num-supernodes={clients} client-resources-num-cpus=1",
            lambda line: print(line, flush=True),
        )
    return 0 if outcome.completed else 1


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and save its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks peer_overhead")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    data = str(Path(args.data).resolve())
    walls: dict[str, list[float]] = {"fedpneumo": [], "peer": []}
    rounds: dict[str, list[float]] = {"fedpneumo": [], "peer": []}
    parts: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ("fedpneumo", "peer") if repeat % 2 == 0 else ("peer", "fedpneumo")
            for side in order:
                if side == "fedpneumo":
                    out = Path(tmp) / f"run{repeat}"
                    wall, steady_rounds, split = run_fedpneumo(
                        data, args.rounds, args.clients, out
                    )
                    for part, values in split.items():
                        parts.setdefault(part, []).extend(values)
                else:
                    wall, steady_rounds = run_peer(data, args.rounds, args.clients)
                walls[side].append(wall)
                rounds[side].append(statistics.median(steady_rounds))
                print(
                    f"{side}: {wall:.1f} s, {rounds[side][-1]:.2f} s/round", flush=True
                )
    wall_ratios = [
        a / b for a, b in zip(walls["fedpneumo"], walls["peer"], strict=True)
    ]
    round_ratios = [
        a / b for a, b in zip(rounds["fedpneumo"], rounds["peer"], strict=True)
    ]
    figures = {
        "fedpneumo_wall_seconds": summarize(walls["fedpneumo"]),
        "peer_wall_seconds": summarize(walls["peer"]),
        "ratio_wall_fedpneumo_peer": summarize(wall_ratios),
        "fedpneumo_round_seconds": summarize(rounds["fedpneumo"]),
        "peer_round_seconds": summarize(rounds["peer"]),
        "ratio_round_fedpneumo_peer": summarize(round_ratios),
        "fedpneumo_round_parts_seconds": {
            part: summarize(values) for part, values in parts.items() if values
        },
        "config": f"{args.clients} clients, {args.rounds} rounds, full data, cnn, "
        "1 local epoch, Dirichlet(0.5), no augmentation; each side a whole "
        f"command, {args.repeats} alternating repeats",
    }
    save_result(
        "peer_overhead",
        figures,
        [
            target(
                "whole-run wall fedpneumo / minimal Flower app",
                statistics.median(wall_ratios),
                "<=",
                1.05,
            )
        ],
        notes="fedpneumo's side includes what the peer does not do: its config "
        "and data checks before Flower starts, the label-count query before round 1, "
        "tracking every client's epochs and every hospital's evaluation in SQLite, "
        "the spool, checkpoints and the resume state each round, and the summary.",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        peer = argparse.ArgumentParser(prog="python -m benchmarks.peer_overhead peer")
        peer.add_argument("--data", required=True)
        peer.add_argument("--rounds", type=int, required=True)
        peer.add_argument("--clients", type=int, required=True)
        ns = peer.parse_args(sys.argv[2:])
        sys.exit(peer_command(ns.data, ns.rounds, ns.clients))
    main()
