"""In-memory X-ray splits: the types every loader returns, sampling, toy data."""

from dataclasses import dataclass

import numpy as np

from persistence.errors import InputError

SYNTHETIC = "synthetic"


class DataError(InputError):
    """Report unusable data input with a one-line, actionable message."""


@dataclass(frozen=True, eq=False)
class Split:
    """Hold one split: uint8 images (N, H, W) and int64 labels (N,) in {0, 1}."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise ValueError(
                f"Split needs images (N, H, W) and labels (N,), got "
                f"{self.images.shape} and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        """Return the samples at ``indices`` as a new split."""
        return Split(self.images[indices], self.labels[indices])


@dataclass(frozen=True, eq=False)
class XrayData:
    """Hold the splits of one data source and where they came from."""

    splits: dict[str, Split]
    source: str
    synthetic: bool = False

    def split(self, name: str) -> Split:
        """Return split ``name`` or raise a DataError listing the available ones."""
        if name not in self.splits:
            raise DataError(
                f"split '{name}' is not in {self.source}; available splits: "
                f"{', '.join(self.splits)}"
            )
        return self.splits[name]


def stratified_indices(labels: np.ndarray, n_take: int, seed: int) -> np.ndarray:
    """Return sorted indices of n_take samples drawn keeping the class ratio."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_take * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    # Largest-remainder rounding keeps the total at n_take and the ratio closest
    leftover = n_take - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == cls))[:q]
        for cls, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def limit_split(split: Split, limit: int | None, seed: int) -> Split:
    """Cap a split at ``limit`` samples, keeping the class ratio; None keeps all."""
    if limit is None or limit >= len(split):
        return split
    if limit < 1:
        raise DataError(f"sample limit {limit} must be a positive integer or null")
    return split.subset(stratified_indices(split.labels, limit, seed))


def make_synthetic(
    n_train: int = 400,
    n_val: int = 100,
    n_test: int = 0,
    image_size: int = 28,
    seed: int = 0,
) -> XrayData:
    """Make learnable toy X-rays: pneumonia (~70 %) adds a bright blurred blob."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits = {
        name: _synthetic_split(n, image_size, np.random.default_rng([seed, i]))
        for i, (name, n) in enumerate(sizes.items())
        if n > 0
    }
    return XrayData(splits=splits, source=SYNTHETIC, synthetic=True)


def _synthetic_split(n: int, size: int, rng: np.random.Generator) -> Split:
    labels = (rng.permutation(n) < round(0.7 * n)).astype(np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = (rng.uniform(0.3, 0.7, (2, n, 1, 1)) * size).astype(np.float32)
    radius = (rng.uniform(0.08, 0.18, (n, 1, 1)) * size).astype(np.float32)
    amplitude = labels[:, None, None] * rng.uniform(50, 110, (n, 1, 1))
    blob = amplitude * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
    base = 80 + 30 * np.cos(np.pi * (xx / size - 0.5))  # darker at the edges
    noise = rng.normal(0, 25, (n, size, size))
    images = np.clip(base + blob + noise, 0, 255).astype(np.uint8)
    return Split(images, labels)
