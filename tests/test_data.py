"""Tests for client_app.data: loaders, validation, fallbacks and the torch loader."""

import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2

from client_app.data import (
    DataError,
    Split,
    XrayData,
    limit_split,
    load_image_folder,
    load_npz,
    make_synthetic,
    resolve_data,
)
from client_app.loaders import (
    DEGREES,
    SCALE,
    TRANSLATE_FRACTION,
    DeviceSplit,
    EpochOrder,
    normalise,
)

REAL_NPZ = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "pneumoniamnist.npz"
)


def write_npz(
    path: Path, n_train: int = 40, n_val: int = 10, n_test: int = 0, **overrides
) -> Path:
    """Write a small MedMNIST-layout npz; ``overrides`` replace or drop (None) keys."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n:
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 4 != 0).astype(np.uint8)[
                :, None
            ]
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture
def npz_file(tmp_path: Path) -> tuple[Path, int, int]:
    """Return the real PneumoniaMNIST file, or an equivalent small one, and sizes."""
    if REAL_NPZ.is_file():
        return REAL_NPZ, 4708, 524
    return write_npz(tmp_path / "pneumoniamnist.npz", 60, 20), 60, 20


def test_load_npz_shapes_and_counts(npz_file: tuple[Path, int, int]) -> None:
    path, n_train, n_val = npz_file
    data = load_npz(path)
    assert list(data.splits) == ["train", "val"]
    assert not data.synthetic and data.source == str(path.resolve())
    for split, n in (("train", n_train), ("val", n_val)):
        part = data.split(split)
        assert part.images.shape == (n, 28, 28) and part.images.dtype == np.uint8
        assert part.labels.shape == (n,) and part.labels.dtype == np.int64
        assert set(np.unique(part.labels)) == {0, 1}
    with pytest.raises(DataError, match="available splits: train, val"):
        data.split("test")


def test_load_npz_resizes(npz_file: tuple[Path, int, int]) -> None:
    data = load_npz(npz_file[0], image_size=32)
    assert data.split("val").images.shape[1:] == (32, 32)


def test_load_npz_with_test_split_and_channel_axis(tmp_path: Path) -> None:
    images = np.zeros((10, 28, 28, 1), np.uint8)
    path = write_npz(tmp_path / "full.npz", n_test=12, val_images=images)
    data = load_npz(path)
    assert list(data.splits) == ["train", "val", "test"]
    assert len(data.split("test")) == 12
    assert data.split("val").images.shape == (10, 28, 28)


def _write_bytes(content: bytes) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        path.write_bytes(content)
        return path

    return write


def _truncated(path: Path) -> Path:
    content = write_npz(path).read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def _plain_npy(path: Path) -> Path:
    with path.open("wb") as file:
        np.save(file, np.zeros((3, 28, 28), np.uint8))
    return path


def _garbage_member(path: Path) -> Path:
    with np.load(write_npz(path)) as npz:
        members = {f"{key}.npy": npz.zip.read(f"{key}.npy") for key in npz.files}
    members["train_images.npy"] = b"garbage"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


BAD_NPZ_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing", lambda p: p, "does not exist"),
    ("corrupt", _write_bytes(b"definitely not a zip"), "is not a readable .npz"),
    ("truncated", _truncated, "is not a readable .npz"),
    ("npy", _plain_npy, "is not a readable .npz"),
    ("garbage_member", _garbage_member, r"members \['train_images'\] are not"),
    ("no_val_labels", lambda p: write_npz(p, val_labels=None), r"\['val_labels'\]"),
    ("half_test", lambda p: write_npz(p, n_test=5, test_labels=None), "test_labels"),
    (
        "flat_images",
        lambda p: write_npz(p, train_images=np.zeros((40, 784), np.uint8)),
        r"train_images .* shape \(40, 784\)",
    ),
    (
        "float_images",
        lambda p: write_npz(p, val_images=np.zeros((10, 28, 28), np.float32)),
        "val_images .* dtype float32",
    ),
    (
        "onehot_labels",
        lambda p: write_npz(p, val_labels=np.zeros((10, 2), np.uint8)),
        r"val_labels .* shape \(10, 2\)",
    ),
    (
        "labels_0_2",
        lambda p: write_npz(p, val_labels=np.array([0, 2, 5, 2, 0, 0, 0, 0, 0, 0])),
        r"labels outside \{0,1\} in val_labels of '.*bad.npz': \[2, 5\]",
    ),
    (
        "len_mismatch",
        lambda p: write_npz(p, train_labels=np.zeros((39, 1), np.uint8)),
        "train_images .* has 40 samples but train_labels has 39",
    ),
    (
        "empty_val",
        lambda p: write_npz(
            p,
            val_images=np.zeros((0, 28, 28), np.uint8),
            val_labels=np.zeros((0, 1), np.uint8),
        ),
        "split 'val' .* is empty",
    ),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [case[1:] for case in BAD_NPZ_CASES],
    ids=[case[0] for case in BAD_NPZ_CASES],
)
def test_load_npz_rejects_bad_input(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    path = make(tmp_path / "bad.npz")
    with pytest.raises(DataError, match=message) as caught:
        load_npz(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_keys_message_lists_found_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"found \['images'\]"):
        load_npz(tmp_path / "x.npz")


Layout = dict[str, tuple[int | None, int | None]]


def write_kermany(root: Path, splits: Layout) -> Path:
    """Write (normal, pneumonia) counts of odd-sized PNG/JPEG files; None: no dir."""
    rng = np.random.default_rng(0)
    for split, counts in splits.items():
        for class_name, count in zip(("NORMAL", "PNEUMONIA"), counts, strict=True):
            if count is None:
                continue
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 7 * i, 30 + 5 * i)
                mode, suffix = ("RGB", ".jpeg") if i % 2 else ("L", ".png")
                shape = (size[1], size[0], 3) if mode == "RGB" else size[::-1]
                array = rng.integers(0, 256, shape, np.uint8)
                Image.fromarray(array, mode).save(folder / f"img{i}{suffix}")
            (folder / "notes.txt").write_text("ignored")
    return root


def test_load_image_folder_resizes_and_labels(tmp_path: Path) -> None:
    root = write_kermany(tmp_path, {"train": (3, 5), "val": (2, 2), "test": (1, 2)})
    data = load_image_folder(root, image_size=28)
    assert list(data.splits) == ["train", "val", "test"]
    train = data.split("train")
    assert train.images.shape == (8, 28, 28) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert data.split("test").images.shape == (3, 28, 28)


def test_load_image_folder_carves_val_when_absent(tmp_path: Path) -> None:
    root = write_kermany(tmp_path, {"train": (10, 10)})
    data = load_image_folder(root, image_size=16)
    assert len(data.split("val")) == 2 and len(data.split("train")) == 18
    assert sorted(data.split("val").labels.tolist()) == [0, 1]
    assert data.split("val").images.shape[1:] == (16, 16)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train": (2, 2), "val": (2, None)}, r"val' has no PNEUMONIA/ folder"),
        ({"val": (2, 2)}, "has no train/ folder"),
        ({"train": (0, 0)}, "has no .jpeg/.jpg/.png images"),
    ],
    ids=["no_pneumonia", "no_train", "empty"],
)
def test_load_image_folder_rejects_bad_layout(
    tmp_path: Path, layout: Layout, message: str
) -> None:
    root = write_kermany(tmp_path, layout)
    with pytest.raises(DataError, match=message):
        load_image_folder(root)


def test_limit_split_keeps_ratio_and_is_deterministic() -> None:
    labels = np.array([0] * 30 + [1] * 70)
    split = Split(np.arange(100, dtype=np.uint8)[:, None, None].repeat(4, 1), labels)
    limited = limit_split(split, 20, seed=1)
    assert len(limited) == 20 and int(limited.labels.sum()) == 14
    again = limit_split(split, 20, seed=1)
    assert np.array_equal(limited.images, again.images)
    other = limit_split(split, 20, seed=2)
    assert not np.array_equal(limited.images, other.images)
    assert limit_split(split, None, seed=0) is split
    assert limit_split(split, 500, seed=0) is split
    with pytest.raises(DataError, match="sample limit 0"):
        limit_split(split, 0, seed=0)


def test_make_synthetic_is_deterministic_and_imbalanced() -> None:
    first = make_synthetic(n_train=200, n_val=50, n_test=30, seed=3)
    second = make_synthetic(n_train=200, n_val=50, n_test=30, seed=3)
    assert first.synthetic and first.source == "synthetic"
    assert list(first.splits) == ["train", "val", "test"]
    assert np.array_equal(first.split("train").images, second.split("train").images)
    assert first.split("train").labels.mean() == pytest.approx(0.7)
    train = first.split("train")
    # Pneumonia images carry a bright blob, so their peak brightness is higher
    peaks = train.images.reshape(len(train), -1).max(axis=1)
    assert peaks[train.labels == 1].mean() > peaks[train.labels == 0].mean()


def test_resolve_data_explicit_paths(
    tmp_path: Path, npz_file: tuple[Path, int, int]
) -> None:
    with pytest.raises(DataError, match="'/no/such.npz' does not exist"):
        resolve_data("/no/such.npz", allow_synthetic_fallback=True)
    assert resolve_data("synthetic").synthetic
    assert len(resolve_data(str(npz_file[0])).split("val")) == npz_file[2]
    folder = write_kermany(tmp_path / "kermany", {"train": (2, 2), "val": (1, 1)})
    assert len(resolve_data(str(folder)).split("val")) == 2


def test_resolve_data_uses_medmnist_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_npz(tmp_path / "pneumoniamnist.npz", n_train=12)
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    data = resolve_data(None, allow_download=False)
    assert len(data.split("train")) == 12
    assert data.source == str((tmp_path / "pneumoniamnist.npz").resolve())


@pytest.fixture
def failing_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point MEDMNIST_ROOT at an empty folder and the download at a closed port."""
    monkeypatch.setenv("HOME", str(tmp_path))  # importing medmnist creates ~/.medmnist
    import medmnist.info

    root = tmp_path / "medmnist"
    monkeypatch.setenv("MEDMNIST_ROOT", str(root))
    info = medmnist.info.INFO["pneumoniamnist"]
    monkeypatch.setitem(info, "url", "http://127.0.0.1:9/pneumoniamnist.npz")
    return root


def test_resolve_data_download_failure_falls_back_only_when_allowed(
    failing_download: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="downloading it failed") as caught:
        resolve_data(None, allow_download=True)
    assert str(failing_download) in str(caught.value)
    assert "data.path" in str(caught.value)
    data = resolve_data(None, allow_download=True, allow_synthetic_fallback=True)
    assert data.synthetic
    assert "SYNTHETIC" in caplog.text
    assert time.monotonic() - start < 25
    assert not (failing_download / "pneumoniamnist.npz").exists()


def test_resolve_data_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    with pytest.raises(DataError, match="no pneumoniamnist.npz in"):
        resolve_data(None, allow_download=False)
    data = resolve_data("", allow_download=False, allow_synthetic_fallback=True)
    assert isinstance(data, XrayData) and data.synthetic


@pytest.mark.parametrize("augment", [False, True])
def test_device_split_batches(augment: bool) -> None:
    split = make_synthetic(n_train=70, n_val=10).split("train")
    data = DeviceSplit(split, torch.device("cpu"))
    order = EpochOrder(len(data), seed=0).next_epoch()
    batches = list(data.batches(32, order, augment=augment))
    assert [len(labels) for _, labels in batches] == [32, 32, 6]
    images, labels = batches[0]
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.float32
    assert -1.0 <= images.min() and images.max() <= 1.0
    assert set(labels.tolist()) <= {0.0, 1.0}
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels[order])
    if not augment:
        again = next(data.batches(32, EpochOrder(len(data), seed=0).next_epoch()))
        assert torch.equal(again[1], labels) and torch.equal(again[0], images)


class ImageByImage(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """The reference pipeline: torchvision's RandomAffine on one image at a time."""

    def __init__(self, split: Split) -> None:
        self.images = torch.from_numpy(split.images).unsqueeze(1)
        self.labels = torch.from_numpy(split.labels).float()
        self.affine = v2.RandomAffine(
            degrees=DEGREES,
            translate=(TRANSLATE_FRACTION, TRANSLATE_FRACTION),
            scale=SCALE,
            interpolation=v2.InterpolationMode.BILINEAR,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalise(self.affine(self.images[index])), self.labels[index]


def test_device_batches_equal_a_seeded_dataloader_with_torchvisions_affine(
    data_file: Path,
) -> None:
    # Same seeds, same epochs: the same shuffles, the same augmentation draws
    # from the global generator, and the same warped pixels, bit for bit.
    split = load_npz(data_file).split("train").subset(np.arange(300))
    loader = DataLoader(
        ImageByImage(split),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(7),
    )
    torch.manual_seed(11)
    reference = [batch for _ in range(3) for batch in loader]
    after_reference = torch.rand(3)
    torch.manual_seed(11)
    data, order = DeviceSplit(split, torch.device("cpu")), EpochOrder(300, seed=7)
    ours = [b for _ in range(3) for b in data.batches(64, order.next_epoch(), True)]
    assert torch.equal(torch.rand(3), after_reference)  # as many draws
    assert len(ours) == len(reference) == 15
    for (images, labels), (want_images, want_labels) in zip(
        ours, reference, strict=True
    ):
        assert torch.equal(labels, want_labels)
        assert torch.equal(images, want_images)
