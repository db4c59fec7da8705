"""PyTorch datasets and loaders over in-memory splits, with augmentation."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2

from client_app.data import Split

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
TRANSLATE_FRACTION = 2 / 28  # ±2 px at 28 px, scaled for larger images


class XrayTorchDataset(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Serve (image (1, H, W) float normalised, label float scalar) pairs."""

    def __init__(self, split: Split, augment: bool = False, hflip: bool = False):
        self.images = torch.from_numpy(split.images).unsqueeze(1)  # (N, 1, H, W) u8
        self.labels = torch.from_numpy(split.labels).float()
        self.transform = _augmentation(hflip) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        image = (image.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
        return image, self.labels[index]


def _augmentation(hflip: bool) -> v2.Transform:
    affine = v2.RandomAffine(
        degrees=10,
        translate=(TRANSLATE_FRACTION, TRANSLATE_FRACTION),
        scale=(0.9, 1.1),
        interpolation=v2.InterpolationMode.BILINEAR,
    )
    # Off by default: the heart sits on the left, so flips make implausible X-rays
    return v2.Compose([affine, v2.RandomHorizontalFlip()]) if hflip else affine


def make_loader(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Build a single-process DataLoader whose shuffle order is seeded."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        XrayTorchDataset(split, augment=augment),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        generator=generator,
    )
