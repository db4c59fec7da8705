"""The plain PyTorch trainer on small synthetic data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from client_app.data import make_synthetic
from client_app.model import build_model
from client_app.trainer import (
    Callback,
    TrainingDivergedError,
    TrainSettings,
    fit,
    load_checkpoint,
    lr_at,
    predict_proba,
)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.metrics: list[Mapping[str, float]] = []

    def on_train_start(self) -> None:
        self.events.append("start")

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.events.append(f"epoch{epoch}")
        self.metrics.append(metrics)

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self.events.append("end")

    def on_train_error(self, exc: BaseException) -> None:
        self.events.append(type(exc).__name__)


@pytest.fixture(scope="module")
def data():  # noqa: ANN201
    return make_synthetic(n_train=256, n_val=96, n_test=64, seed=1)


def test_fit_learns_and_selects_the_best_epoch(data, tmp_path: Path) -> None:  # noqa: ANN001
    recorder = Recorder()
    settings = TrainSettings(
        epochs=4,
        batch_size=32,
        lr=3e-3,
        lr_schedule="cosine",
        select_best=True,
        checkpoint_path=tmp_path / "best.pt",
        checkpoint_meta={"model": {"name": "cnn"}},
    )
    model = build_model("cnn", width=8)
    result = fit(
        model,
        data.split("train"),
        data.split("val"),
        settings,
        test=data.split("test"),
        callbacks=[recorder],
    )
    assert recorder.events == ["start", "epoch1", "epoch2", "epoch3", "epoch4", "end"]
    losses = [m["train_loss"] for m in recorder.metrics]
    assert losses[-1] < losses[0]
    best = max(range(4), key=lambda i: recorder.metrics[i]["val_auroc"]) + 1
    assert result.best_epoch == best
    assert result.summary["final_val_auroc"] == pytest.approx(
        recorder.metrics[best - 1]["val_auroc"]
    )
    assert result.summary["final_val_auroc"] > 0.8
    assert "final_test_auroc" in result.summary
    saved = load_checkpoint(tmp_path / "best.pt")
    assert saved["epoch"] == best and 0 < saved["threshold"] < 1


def test_divergence_is_reported_to_callbacks(data) -> None:  # noqa: ANN001
    recorder = Recorder()
    model = build_model("cnn", width=8, norm="none")
    settings = TrainSettings(epochs=2, batch_size=8, lr=1e6, optimizer="sgd")
    with pytest.raises(TrainingDivergedError, match="train.lr=1e\\+06"):
        fit(model, data.split("train"), None, settings, callbacks=[recorder])
    assert recorder.events[-1] == "TrainingDivergedError"


def test_proximal_term_keeps_weights_near_the_global_model(data) -> None:  # noqa: ANN001
    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = build_model("cnn", width=8)
        start = [p.detach().clone() for p in model.parameters()]
        fit(
            model,
            data.split("train"),
            None,
            TrainSettings(epochs=2, lr=1e-2, proximal_mu=mu),
        )
        return sum(
            (p.detach() - s).pow(2).sum().item()
            for p, s in zip(model.parameters(), start, strict=True)
        )

    assert drift(10.0) < drift(0.0)


class LayoutProbe(Callback):
    """Notes whether a conv weight is channels-last when each epoch ends."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.channels_last: list[bool] = []

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.channels_last.append(
            self.weight.is_contiguous(memory_format=torch.channels_last)
            and not self.weight.is_contiguous()
        )


def test_cpu_training_runs_channels_last_and_hands_back_standard_weights(
    data, tmp_path: Path
) -> None:  # noqa: ANN001
    model = build_model("cnn", width=8)
    # The second conv has 8 input channels: its two layouts differ.
    weight = model.features[1][0].weight
    probe = LayoutProbe(weight)
    settings = TrainSettings(
        epochs=2,
        batch_size=32,
        device="cpu",
        select_best=True,
        checkpoint_path=tmp_path / "best.pt",
    )
    fit(model, data.split("train"), data.split("val"), settings, callbacks=[probe])
    # Channels-last for every epoch, the held-out scoring inside it included.
    assert probe.channels_last == [True, True]
    assert all(p.is_contiguous() for p in model.parameters())
    saved = load_checkpoint(tmp_path / "best.pt")["state_dict"]
    assert all(t.is_contiguous() for t in saved.values())
    predict_proba(model, data.split("val"), device="cpu")
    assert all(p.is_contiguous() for p in model.parameters())


def test_cosine_schedule() -> None:
    assert lr_at(1e-3, "constant", 7, 10) == 1e-3
    assert lr_at(1e-3, "cosine", 1, 10) == pytest.approx(1e-3)
    assert lr_at(1e-3, "cosine", 10, 10) == pytest.approx(5e-5)
    values = [lr_at(1e-3, "cosine", r, 10) for r in range(1, 11)]
    assert values == sorted(values, reverse=True)
