"""Benchmark: the project's training epoch against a minimal PyTorch loop.

Both train the same model (the small CNN), with the same optimizer (AdamW,
lr 1e-3), batch size (64) and loss on the full train split, alternating in one
process. The minimal loop is the fastest plain loop we know for data this
small: the whole split as normalised float tensors on the device, a
permutation per epoch, forward, backward, step; no metrics, no callbacks, no
augmentation; on CPU, the weights channels-last as the project's trainer holds
them. The project's side is ``client_app.trainer.fit`` as clients and
centralized training call it, without a validation split and without
augmentation (the same work); the rows "with val and augmentation" are the
project's full epoch, for information. Epoch seconds exclude each side's first
epoch (warm-up). Target: project / minimal <= 1.10 on CPU, <= 1.5 on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import save_result, summarize, target

BATCH_SIZE = 64
LR = 1e-3


def minimal_epochs(train, device: str, epochs: int, seed: int) -> list[float]:
    """Seconds per epoch of the minimal loop (first epoch included)."""
    import torch
    from torch import nn

    from client_app.model import build_model

    dev = torch.device(device)
    torch.manual_seed(seed)
    images = torch.from_numpy(train.images).unsqueeze(1).to(dev)
    images = (images.float() / 255.0 - 0.5) / 0.5
    labels = torch.from_numpy(train.labels).to(dev, torch.float32)
    model = build_model("cnn").to(dev)
    if dev.type == "cpu":
        # The fastest CPU layout, as the project's trainer uses it.
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(labels), device=dev)
        for start in range(0, len(labels), BATCH_SIZE):
            rows = order[start : start + BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images[rows]), labels[rows]).backward()
            optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def project_epochs(
    train, val, device: str, epochs: int, seed: int, augment: bool
) -> list[float]:
    """Seconds per epoch of the project's fit (first epoch included)."""
    from client_app.model import build_model
    from client_app.trainer import TrainSettings, fit

    settings = TrainSettings(
        epochs=epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        augment=augment,
        device=device,
        seed=seed,
    )
    result = fit(build_model("cnn"), train, val, settings)
    return [h["epoch_seconds"] for h in result.history]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and save its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks trainer_overhead")
    parser.add_argument(
        "--data", required=True, help="PneumoniaMNIST .npz file or image folder"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from client_app.data import load_data

    data = load_data(args.data)
    train, val = data.split("train"), data.split("val")
    times: dict[str, list[float]] = {"project": [], "minimal": [], "full": []}
    for repeat in range(args.repeats):
        sides = ("project", "minimal") if repeat % 2 == 0 else ("minimal", "project")
        for side in sides:
            if side == "project":
                epochs = project_epochs(
                    train, None, args.device, args.epochs, repeat, augment=False
                )
            else:
                epochs = minimal_epochs(train, args.device, args.epochs, repeat)
            times[side] += epochs[1:]
        full = project_epochs(train, val, args.device, args.epochs, repeat, True)
        times["full"] += full[1:]
    ratio = statistics.median(times["project"]) / statistics.median(times["minimal"])
    full_ratio = statistics.median(times["full"]) / statistics.median(times["minimal"])
    figures = {
        "project_epoch_seconds": summarize(times["project"]),
        "minimal_epoch_seconds": summarize(times["minimal"]),
        "ratio_project_minimal": ratio,
        "project_with_val_and_augmentation_epoch_seconds": summarize(times["full"]),
        "ratio_with_val_and_augmentation_minimal": full_ratio,
        "config": f"{args.device}, full train split ({len(train)} images), cnn, "
        f"AdamW lr {LR:g}, batch {BATCH_SIZE}, {args.epochs} epochs x "
        f"{args.repeats} alternating repeats, first epoch of each excluded",
    }
    goal = 1.10 if args.device == "cpu" else 1.5
    name = "trainer_overhead" if args.device == "cpu" else "trainer_overhead_gpu"
    save_result(
        name,
        figures,
        [target(f"fit epoch / minimal loop epoch ({args.device})", ratio, "<=", goal)],
        notes="Same work on both sides: no validation, no augmentation. The full "
        "epoch adds a validation pass over the val split (scored with metrics) and "
        "the batched random affine augmentation.",
        argv=argv,
    )
    return figures


if __name__ == "__main__":
    main()
