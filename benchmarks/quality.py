"""Benchmark 5: model quality on PneumoniaMNIST.

Centralized training against FedAvg, FedProx and FedAdam under IID,
Dirichlet(0.5) and Dirichlet(0.1) label skew across 10 clients, all from the
experiment preset (selection on `val` only). Reports the best round's val AUROC
and accuracy, and test figures of the saved best model when the data file has
a test split.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import federated_session, save_result, target

PARTITIONS = {
    "iid": ["partition=iid"],
    "dirichlet(0.5)": ["partition=dirichlet", "partition.alpha=0.5"],
    "dirichlet(0.1)": ["partition=dirichlet", "partition.alpha=0.1"],
}
STRATEGIES = ("fedavg", "fedprox", "fedadam")
# Privacy/utility: FedAvg under Dirichlet(0.5), server-side fixed clipping at
# three noise levels, and no privacy on the same GroupNorm model.
PRIVACY_BASE = ["partition=dirichlet", "partition.alpha=0.5", "strategy=fedavg"]
PRIVACY_CLIP = 0.1
PRIVACY_ROWS = {
    "none": ["model.norm=group"],
    **{
        f"server_fixed z={z:g}": [
            "privacy=server_fixed",
            f"privacy.noise_multiplier={z:g}",
            f"privacy.clipping_norm={PRIVACY_CLIP:g}",
        ]
        for z in (0.5, 1.0, 2.0)
    },
}
PRIVACY_PLOT = Path(__file__).resolve().parents[1] / "docs" / "privacy_utility.png"
# Config sections that decide a trained model (a reused run must match them all).
SHAPING_KEYS = (
    "seed",
    "num_rounds",
    "data",
    "model",
    "train",
    "partition",
    "strategy",
    "privacy",
)


def has_test_split(path: str) -> bool:
    """Whether a MedMNIST file carries the test split."""
    import numpy as np

    with np.load(path) as data:
        return "test_images" in data.files


def scores(checkpoint: str, data: str, split: str) -> dict[str, float]:
    """Evaluate a saved model on a split."""
    from fedpneumo.centralized import evaluate_checkpoint

    return evaluate_checkpoint(Path(checkpoint), data, split)


def feasible_partition(overrides: list[str]) -> tuple[list[str], list[int]]:
    """Return overrides whose partition draw succeeds, and the client sizes.

    Dirichlet(0.1) over two classes and ten clients usually leaves a client
    under partition.min_partition_size; then the first partition.seed from 0
    whose draw gives every client enough images is used (and reported).
    """
    from server_app.compose import load_config, resolve_paths
    from server_app.config import ConfigError
    from server_app.factories import check_partitions, configured_data

    # partition.seed changes only the draw, never which images are in play.
    labels = (
        configured_data(resolve_paths(load_config(overrides))).split("train").labels
    )
    for extra in ([], *([f"partition.seed={s}"] for s in range(100))):
        try:
            cfg = resolve_paths(load_config([*overrides, *extra]))
            sizes = check_partitions(cfg, labels)
        except ConfigError:
            continue
        return [*overrides, *extra], sizes
    raise RuntimeError(f"no partition.seed below 100 works for {overrides}")


def reusable_run(
    overrides: list[str], mode: str, epochs: int | None = None
) -> tuple[Any, str] | None:
    """Return a completed run with this exact setup, and its database URL.

    Lets an interrupted benchmark go on where it stopped (``--reuse``): the
    run's stored config must match on everything that shapes the model.
    """
    from sqlalchemy import select

    from persistence.db import get_engine, session_scope
    from persistence.models import Run
    from server_app.compose import (
        database_url,
        load_config,
        resolve_paths,
        snapshot,
    )

    cfg = resolve_paths(load_config(overrides))
    if epochs is not None:
        cfg.train.epochs = epochs
    want = snapshot(cfg)
    url = database_url(cfg)
    if url.startswith("sqlite") and not Path(cfg.db.sqlite_path).exists():
        return None
    with session_scope(get_engine(url)) as db:
        runs = db.scalars(
            select(Run)
            .where(Run.status == "completed", Run.training_mode == mode)
            .order_by(Run.id.desc())
        ).all()
        for run in runs:
            have = dict(run.config)
            # Snapshots from before partition.seed existed drew with the run's seed.
            have["partition"] = {"seed": None, **have.get("partition", {})}
            if all(have.get(key) == want[key] for key in SHAPING_KEYS):
                db.expunge(run)
                return run, url
    return None


def federated(
    base: list[str], extra: list[str], data: str, reuse: bool
) -> dict[str, float]:
    """Run one federated configuration; return its best-round figures."""
    from sqlalchemy import select

    from persistence.db import get_engine, session_scope
    from persistence.models import Client, ClientEvaluation, ServerEvaluation

    overrides, sizes = feasible_partition([*base, *extra])
    reused = reusable_run(overrides, "federated") if reuse else None
    if reused is None:
        outcome = federated_session(overrides)
        run, url = outcome.run, outcome.url
    else:
        run, url = reused
        print(f"reusing completed run {run.id} for {' '.join(extra)}", flush=True)
    with session_scope(get_engine(url)) as db:
        evals = db.scalars(
            select(ServerEvaluation).where(ServerEvaluation.run_id == run.id)
        ).all()
        best = max(evals, key=lambda e: -math.inf if e.auroc is None else e.auroc)
        # Each hospital's AUROC of the best round's model on its held-out
        # slice; a one-class slice has none and is counted apart.
        hospitals = db.execute(
            select(Client.client_identifier, ClientEvaluation.auroc)
            .join(Client, ClientEvaluation.client_id == Client.id)
            .where(
                ClientEvaluation.run_id == run.id,
                ClientEvaluation.round_number == best.round_number,
            )
        ).all()
        scored = [(a, name) for name, a in hospitals if a is not None]
        worst = min(scored, default=(None, None))
        row = {
            "run_id": run.id,
            "overrides": [*extra, *overrides[len(base) + len(extra) :]],
            "client_train_images": sizes,
            "best_round": best.round_number,
            "val_auroc": best.auroc,
            "val_accuracy": best.accuracy,
            "worst_hospital_val_auroc": worst[0],
            "worst_hospital": worst[1],
            "hospitals_without_auroc": len(hospitals) - len(scored),
            "checkpoint": run.checkpoint_path,
            "url": url,
        }
    if has_test_split(data):
        test = scores(row["checkpoint"], data, "test")
        row.update(test_auroc=test["auroc"], test_accuracy=test["accuracy"])
    return row


def private_row(row: dict[str, Any]) -> dict[str, Any]:
    """Add the run's final epsilon and delta to a federated row."""
    from sqlalchemy import select

    from persistence.db import get_engine, session_scope
    from persistence.models import PrivacySpent, Run

    with session_scope(get_engine(row.pop("url"))) as db:
        spent = db.scalars(
            select(PrivacySpent)
            .where(PrivacySpent.run_id == row["run_id"])
            .order_by(PrivacySpent.round_number.desc())
        ).first()
        run = db.get_one(Run, row["run_id"])
        row["privacy"] = run.privacy or "none"
        row["final_epsilon"] = spent.epsilon if spent else None
        row["delta"] = spent.delta if spent else None
    return row


def plot_privacy(run_ids: list[int], url: str) -> None:
    """Draw the privacy/utility figure with the project's own `runs plot`."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "fedpneumo", "runs", "plot"]
    command += [*map(str, run_ids), "-o", str(PRIVACY_PLOT), "--db", url]
    subprocess.run(command, check=True)


def reused_centralized_row(run: Any, url: str, data: str) -> dict[str, Any]:
    """Figures of a finished centralized run, from its stored final metrics."""
    from sqlalchemy import select

    from persistence.db import get_engine, session_scope
    from persistence.models import RunMetric

    with session_scope(get_engine(url)) as db:
        final = {
            m.metric_name: m
            for m in db.scalars(
                select(RunMetric).where(
                    RunMetric.run_id == run.id,
                    RunMetric.metric_name.like("final_%"),
                )
            )
        }
    # The trainer writes final_* at the step of the epoch it selected on val.
    row = {
        "run_id": run.id,
        "best_round": final["final_val_auroc"].step,
        "val_auroc": final["final_val_auroc"].metric_value,
        "val_accuracy": final["final_val_accuracy"].metric_value,
        "checkpoint": run.checkpoint_path,
    }
    if has_test_split(data):
        test = scores(run.checkpoint_path, data, "test")
        row.update(test_auroc=test["auroc"], test_accuracy=test["accuracy"])
    return row


def centralized(base: list[str], data: str, reuse: bool) -> dict[str, float]:
    """Run the centralized baseline with the same preset."""
    from fedpneumo.centralized import run_centralized
    from server_app.compose import load_config, resolve_paths
    from server_app.factories import centralized_input

    cfg = resolve_paths(load_config(base))
    cfg.train.epochs = cfg.num_rounds * cfg.train.local_epochs
    reused = reusable_run(base, "centralized", cfg.train.epochs) if reuse else None
    if reused is not None:
        print(f"reusing completed run {reused[0].id} for centralized", flush=True)
        return reused_centralized_row(*reused, data)
    result = run_centralized(cfg, *centralized_input(cfg))
    summary = result.fit.summary
    row = {
        "run_id": result.run_id,
        "best_round": summary["best_epoch"],
        "val_auroc": summary["final_val_auroc"],
        "val_accuracy": summary["final_val_accuracy"],
        "checkpoint": summary["checkpoint_path"],
    }
    if has_test_split(data):
        row.update(
            test_auroc=summary["final_test_auroc"],
            test_accuracy=summary["final_test_accuracy"],
        )
    return row


def main(argv: list[str] | None = None) -> dict:
    """Run the quality matrix and save its table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--preset", default="pneumonia_dirichlet05")
    parser.add_argument("--outputs", default=None)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take completed runs with the same setup from the --outputs database",
    )
    args = parser.parse_args(argv)
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        out = args.outputs or tmp
        base = [
            f"+experiment={args.preset}",
            f"data.path={data}",
            f"outputs_dir={out}",
            "experiment_name=bench-quality",
        ]
        table = {"centralized": centralized(base, data, args.reuse)}
        for pname, pargs in PARTITIONS.items():
            for strategy in STRATEGIES:
                row = federated(
                    base, [*pargs, f"strategy={strategy}"], data, args.reuse
                )
                row.pop("url")
                table[f"{strategy} {pname}"] = row
        privacy = {
            name: private_row(
                federated(base, [*PRIVACY_BASE, *extra], data, args.reuse)
            )
            for name, extra in PRIVACY_ROWS.items()
        }
        url = f"sqlite:///{Path(out) / 'fedpneumo.db'}"
        plot_privacy([row["run_id"] for row in privacy.values()], url)
    headline = table["fedavg dirichlet(0.5)"]
    figures = {
        "table": table,
        "privacy_table": privacy,
        "config": f"+experiment={args.preset} (conf/experiment/{args.preset}.yaml), "
        "10 clients; centralized trains num_rounds x local_epochs epochs",
        "has_test_split": has_test_split(data),
    }
    key = "test" if figures["has_test_split"] else "val"
    save_result(
        "quality",
        figures,
        [
            target(
                f"FedAvg Dirichlet(0.5) {key} AUROC",
                headline[f"{key}_auroc"],
                ">=",
                0.97,
            ),
            target(
                f"FedAvg Dirichlet(0.5) {key} accuracy",
                headline[f"{key}_accuracy"],
                ">=",
                0.90,
            ),
        ],
        notes="The targets are set on the official test split, withheld here; "
        "without it the table reports val figures, which the models were "
        "selected on and so overstate test performance. Dirichlet(0.1) over two "
        "classes and 10 clients leaves some client with under 10 images for the "
        "preset's seed, so that row draws with the first partition.seed that "
        "works (see its overrides); that draw hands one client most of the data "
        "(client_train_images), which is why it scores like centralized training. "
        "FedAdam's server-side Adam step also moves BatchNorm running statistics; "
        "it is not tuned here.",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
