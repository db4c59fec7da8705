"""Batches of a split held as tensors on the training device, with augmentation.

An X-ray split is small (PneumoniaMNIST's train split is 3.7 MB as uint8), so
it lives on the device and each batch is one gather, one normalisation and,
when augmenting, one batched affine warp: no per-image Python work and no
host-to-device copy per batch. The shuffle order and the augmentation draws
are those of a seeded ``torch.utils.data.DataLoader`` over the same split with
torchvision's ``RandomAffine`` applied image by image, so training numbers
match that pipeline up to floating-point order (tests/test_data.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.nn.functional import grid_sample

from client_app.data import Split

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
# RandomAffine's ranges: rotation (degrees), translation (a fraction of the
# side: ±2 px at 28 px, scaled for larger images) and scale.
DEGREES = 10.0
TRANSLATE_FRACTION = 2 / 28
SCALE = (0.9, 1.1)


class DeviceSplit:
    """A split as uint8 images (N, 1, H, W) and float labels on one device."""

    def __init__(self, split: Split, device: torch.device) -> None:
        self.device = device
        self.images = torch.from_numpy(split.images).unsqueeze(1).to(device)
        self.labels = torch.from_numpy(split.labels).to(device, torch.float32)
        # For the metrics, which are computed on the host.
        self.host_labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self,
        batch_size: int,
        order: torch.Tensor | None = None,
        augment: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised images, labels) batches, in ``order`` if given.

        Augmentation draws its parameters when the batch is made, as a
        DataLoader does when it fetches the batch.
        """
        if order is not None:
            order = order.to(self.device)
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            rows = slice(start, stop) if order is None else order[start:stop]
            images = self.images[rows]
            if augment:
                images = random_affine(images)
            yield normalise(images), self.labels[rows]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels to floats centred on 0 (mean 0.5, std 0.5)."""
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


class EpochOrder:
    """Each epoch's shuffled order, drawn as a seeded DataLoader draws it.

    A DataLoader iterator draws a base seed from its generator, then its
    RandomSampler draws the permutation, and one more permutation (of which
    it keeps nothing) when the epoch's last index has been taken.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def next_epoch(self) -> torch.Tensor:
        """Return the next epoch's order of the split's rows."""
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(self.n, generator=self.generator)
        torch.randperm(self.n, generator=self.generator)
        return order


def random_affine(images: torch.Tensor) -> torch.Tensor:
    """Rotate, translate and scale each uint8 image by its own random amount.

    The parameters come from torch's global generator in RandomAffine's order
    (angle, x shift, y shift, scale per image) and the warp is its bilinear
    grid sample about the image centre with zero fill, for the whole batch at
    once.
    """
    count, _, height, width = images.shape
    max_dx, max_dy = (
        float(TRANSLATE_FRACTION * width),
        float(TRANSLATE_FRACTION * height),
    )
    low = torch.tensor([-DEGREES, -max_dx, -max_dy, SCALE[0]], dtype=torch.float32)
    high = torch.tensor([DEGREES, max_dx, max_dy, SCALE[1]], dtype=torch.float32)
    # uniform_(a, b) on float32 draws 24 random bits per value and maps them in
    # double precision: the same draws, in the same order, as RandomAffine's
    # four torch.empty(1).uniform_(a, b) calls per image.
    drawn = torch.empty(count, 4).uniform_(0, 1).double()
    params = (drawn * (high - low).double() + low.double()).float().double()
    angle, scale = params[:, 0], params[:, 3]
    shift_x, shift_y = torch.round(params[:, 1]), torch.round(params[:, 2])
    theta = inverse_affine(angle, shift_x, shift_y, scale)
    grid = _affine_grid(theta.to(images.device, torch.float32), height, width)
    # RandomAffine fills with 0 through a mask channel sampled along with the
    # image, then scales each pixel by it: border pixels fade with the mask.
    pixels = torch.cat(
        (images.float(), torch.ones_like(images, dtype=torch.float32)), 1
    )
    warped, mask = grid_sample(
        pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    ).split(1, dim=1)
    return warped.mul_(mask).round_().to(torch.uint8)


def inverse_affine(
    angle: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Return the (B, 2, 3) inverse affine matrices torchvision samples with.

    Rotation by ``angle`` degrees and scaling about the centre, then a shift;
    no shear.
    """
    rot = angle * (math.pi / 180.0)
    cos, sin = torch.cos(rot), torch.sin(rot)
    m0, m1 = cos / scale, sin / scale
    m3, m4 = -sin / scale, cos / scale
    m2 = 0.0 - m0 * shift_x - m1 * shift_y
    m5 = 0.0 - m3 * shift_x - m4 * shift_y
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).reshape(-1, 2, 3)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sampling grids of torchvision's affine for a batch of matrices."""
    device = theta.device
    base = torch.empty(1, height, width, 3, device=device)
    base[..., 0].copy_(
        torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device)
    )
    base[..., 1].copy_(
        torch.linspace(
            (1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device
        ).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor(
        [0.5 * width, 0.5 * height], device=device
    )
    grid = base.view(1, height * width, 3).expand(len(theta), -1, -1).bmm(scaled)
    return grid.view(len(theta), height, width, 2)
