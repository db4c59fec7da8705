"""Binary chest X-ray classifiers that map (B, 1, H, W) images to (B,) logits."""

import math

import torch
from torch import nn

MODEL_NAMES = ("cnn", "resnet18")
NORM_NAMES = ("batch", "group", "none")
GROUPS = 8


def build_model(
    name: str = "cnn", *, width: int = 32, dropout: float = 0.2, norm: str = "batch"
) -> nn.Module:
    """Build model ``name``; resnet18 ignores ``width`` and ``dropout``."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name '{name}' is not one of: {', '.join(MODEL_NAMES)}")
    if norm not in NORM_NAMES:
        raise ValueError(f"model.norm '{norm}' is not one of: {', '.join(NORM_NAMES)}")
    if width < 1:
        raise ValueError(f"model.width must be a positive integer, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    if name == "resnet18":
        # torchvision takes seconds to import: only runs that use it pay.
        from client_app.resnet import SmallResNet18

        return SmallResNet18(norm)
    return SmallCNN(width=width, dropout=dropout, norm=norm)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Return the normalisation layer ``norm`` for ``channels`` feature maps."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # gcd keeps GroupNorm valid for widths that are not multiples of 8
        return nn.GroupNorm(math.gcd(GROUPS, channels), channels)
    return nn.Identity()


def conv_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Return conv3x3 -> norm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
        make_norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Stack three [conv-norm-ReLU]x2 + maxpool stages, then pool and classify."""

    def __init__(self, width: int = 32, dropout: float = 0.2, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels in (width, 2 * width, 4 * width):
            layers += [
                conv_block(in_channels, out_channels, norm),
                conv_block(out_channels, out_channels, norm),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, H, W) images to (B,) logits."""
        return self.head(self.features(x)).squeeze(-1)


def count_parameters(model: nn.Module) -> int:
    """Count all parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
