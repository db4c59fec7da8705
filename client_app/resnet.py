"""ResNet-18 for small 1-channel X-rays (torchvision's, with a small-image stem)."""

from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from client_app.model import make_norm


class SmallResNet18(ResNet):
    """ResNet-18 for small 1-channel inputs: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, norm: str = "batch"):
        super().__init__(
            BasicBlock, [2, 2, 2, 2], num_classes=1, norm_layer=partial(make_norm, norm)
        )
        # At 28 px the ImageNet stem (7x7 stride 2 + pool) would leave 7x7 maps
        self.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, H, W) images to (B,) logits."""
        return super().forward(x).squeeze(-1)
