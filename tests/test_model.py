"""Tests for client_app.model: shapes, errors and that the CNN can learn."""

import pytest
import torch
from torch import nn

from client_app.data import make_synthetic
from client_app.loaders import DeviceSplit, EpochOrder
from client_app.model import MODEL_NAMES, build_model, count_parameters


@pytest.mark.parametrize(
    ("name", "norm"),
    [("cnn", "batch"), ("cnn", "group"), ("cnn", "none"), ("resnet18", "batch")],
)
def test_forward_maps_images_to_logits(name: str, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, width=8, norm=norm)
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3,) and logits.dtype == torch.float32
    model.eval()
    assert model(torch.randn(1, 1, 28, 28)).shape == (1,)


def test_model_names_and_sizes() -> None:
    assert MODEL_NAMES == ("cnn", "resnet18")
    small = count_parameters(build_model("cnn", width=16))
    assert 0 < small < count_parameters(build_model("cnn", width=32))
    assert count_parameters(build_model("resnet18")) > 10_000_000
    # Odd widths still give a valid GroupNorm
    assert isinstance(build_model("cnn", width=12, norm="group"), nn.Module)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "vit"}, "model.name 'vit' is not one of: cnn, resnet18"),
        ({"name": "cnn", "norm": "layer"}, "model.norm 'layer' is not one of"),
        ({"name": "cnn", "width": 0}, "model.width"),
        ({"name": "cnn", "dropout": 1.0}, "model.dropout"),
    ],
)
def test_build_model_rejects_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def test_cnn_learns_synthetic_data() -> None:
    torch.manual_seed(0)
    split = make_synthetic(n_train=128, n_val=0).split("train")
    model = build_model("cnn", width=8, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(4):
        data = DeviceSplit(split, torch.device("cpu"))
        for images, labels in data.batches(32, EpochOrder(len(data), 0).next_epoch()):
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
