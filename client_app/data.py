"""Load chest X-ray data (MedMNIST .npz, Kermany image folders, synthetic)."""

import logging
import os
import socket
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from client_app.splits import (
    SYNTHETIC,
    DataError,
    Split,
    XrayData,
    limit_split,
    make_synthetic,
    stratified_indices,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("train_images", "train_labels", "val_images", "val_labels")
CLASS_DIRS = ("NORMAL", "PNEUMONIA")  # index = label
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
MEDMNIST_FILE = "pneumoniamnist.npz"
MEDMNIST_SIZES = (28, 64, 128, 224)
VAL_FRACTION = 0.1
VAL_SEED = 0
DOWNLOAD_TIMEOUT_S = 10.0
PATH_HINT = (
    "set data.path to a MedMNIST .npz file or a folder with "
    "<split>/NORMAL and <split>/PNEUMONIA"
)


def load_npz(
    path: Path, image_size: int = 28, *, for_training: bool = True
) -> XrayData:
    """Load and validate a MedMNIST-layout .npz file (test split optional).

    Training needs train and val; scoring a model (``for_training=False``)
    takes a file holding any complete split, such as a test-only file.
    """
    path = Path(path).expanduser()
    _check_image_size(image_size)
    if not path.is_file():
        raise DataError(f"data.path '{path}' does not exist; {PATH_HINT}")
    arrays = _read_npz(path)
    keys = {name: [f"{name}_images", f"{name}_labels"] for name in SPLITS}
    present = [name for name in SPLITS if any(k in arrays for k in keys[name])]
    needed = REQUIRED_KEYS if for_training else ()
    missing = [key for key in needed if key not in arrays]
    missing += [
        key
        for name in present
        for key in keys[name]
        if key not in arrays and key not in missing
    ]
    if missing or not present:
        wanted = (
            f"{list(REQUIRED_KEYS)} and optionally test_images/test_labels"
            if for_training
            else "<split>_images and <split>_labels for a split of train, val, test"
        )
        raise DataError(
            f"'{path}' lacks keys {missing or wanted}; found {sorted(arrays)}; a "
            f"MedMNIST file has {wanted}"
        )
    splits = {name: _npz_split(arrays, name, path, image_size) for name in present}
    return XrayData(splits=splits, source=str(path.resolve()))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # np.load would treat any non-zip bytes as a pickle or a single .npy array
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(
            f"data.path '{path}' is not a readable .npz file ({err}); {PATH_HINT}"
        ) from err
    # NpzFile hands back raw bytes for members that are not .npy arrays
    broken = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
    if broken:
        raise DataError(
            f"data.path '{path}' is not a readable .npz file (members {broken} are "
            f"not arrays); {PATH_HINT}"
        )
    return arrays


def _npz_split(
    arrays: dict[str, np.ndarray], name: str, path: Path, image_size: int
) -> Split:
    images, labels = arrays[f"{name}_images"], arrays[f"{name}_labels"]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise DataError(
            f"{name}_images in '{path}' has shape {images.shape}; "
            "expected (N, H, W) or (N, H, W, 1) grayscale images"
        )
    if images.dtype != np.uint8:
        raise DataError(
            f"{name}_images in '{path}' has dtype {images.dtype}; expected uint8"
        )
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(
            f"{name}_labels in '{path}' has shape {labels.shape}; expected (N,) or "
            "(N, 1) binary labels"
        )
    labels = labels.reshape(-1)
    if len(images) != len(labels):
        raise DataError(
            f"{name}_images in '{path}' has {len(images)} samples but "
            f"{name}_labels has {len(labels)}"
        )
    if len(labels) == 0:
        raise DataError(f"split '{name}' in '{path}' is empty")
    return Split(
        _resize(images, image_size),
        _binary_labels(labels, f"{name}_labels of '{path}'"),
    )


def _binary_labels(labels: np.ndarray, what: str) -> np.ndarray:
    values = np.unique(labels)
    bad = [v for v in values.tolist() if v not in (0, 1)]
    if bad:
        raise DataError(f"labels outside {{0,1}} in {what}: {bad[:10]}")
    return labels.astype(np.int64)


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:] == (image_size, image_size):
        return np.ascontiguousarray(images)
    size = (image_size, image_size)
    resized = [
        np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        for img in images
    ]
    return np.stack(resized).astype(np.uint8)


def _check_image_size(image_size: int) -> None:
    if image_size < 8:
        raise DataError(f"data.image_size {image_size} is too small; use 8 or more")


def load_image_folder(
    path: Path, image_size: int = 28, *, for_training: bool = True
) -> XrayData:
    """Load a Kermany-layout folder: <split>/NORMAL and <split>/PNEUMONIA images.

    Training needs train/ (val is carved from it when absent); scoring a model
    (``for_training=False``) takes any split folder, such as only test/.
    """
    path = Path(path).expanduser()
    _check_image_size(image_size)
    if not path.is_dir():
        raise DataError(f"data.path '{path}' is not a directory; {PATH_HINT}")
    splits = {
        name: _folder_split(path / name, image_size)
        for name in SPLITS
        if (path / name).is_dir()
    }
    if not for_training and splits:
        return XrayData(splits=splits, source=str(path.resolve()))
    if "train" not in splits:
        raise DataError(
            f"'{path}' has no train/ folder; expected {path}/train/NORMAL and "
            f"{path}/train/PNEUMONIA (val/ and test/ optional)"
        )
    if "val" not in splits:
        splits["train"], splits["val"] = _carve_val(splits["train"], path)
    ordered = {name: splits[name] for name in SPLITS if name in splits}
    return XrayData(splits=ordered, source=str(path.resolve()))


def _folder_split(split_dir: Path, image_size: int) -> Split:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_name in enumerate(CLASS_DIRS):
        class_dir = split_dir / class_name
        if not class_dir.is_dir():
            raise DataError(
                f"'{split_dir}' has no {class_name}/ folder; expected "
                f"{split_dir}/NORMAL and {split_dir}/PNEUMONIA with .jpeg/.png images"
            )
        files = sorted(
            p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            logger.warning("No images in %s", class_dir)
        images.extend(_read_image(file, image_size) for file in files)
        labels.extend([label] * len(files))
    if not images:
        raise DataError(
            f"'{split_dir}' has no .jpeg/.jpg/.png images under NORMAL/ or PNEUMONIA/"
        )
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def _read_image(file: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(file) as img:
            # Decode JPEGs at reduced scale: X-rays are up to ~2900 px wide
            img.draft("L", (image_size * 2, image_size * 2))
            gray = img.convert("L")
    except OSError as err:
        raise DataError(f"image '{file}' is not readable: {err}") from err
    # Centre-crop to a square before resizing, as MedMNIST did
    size = (image_size, image_size)
    square = ImageOps.fit(gray, size, method=Image.Resampling.BILINEAR)
    return np.asarray(square, dtype=np.uint8)


def _carve_val(train: Split, path: Path) -> tuple[Split, Split]:
    if len(train) < 2:
        raise DataError(
            f"'{path}' has no val/ folder and too few train images to carve one"
        )
    n_val = max(1, round(VAL_FRACTION * len(train)))
    val_idx = stratified_indices(train.labels, n_val, VAL_SEED)
    train_idx = np.setdiff1d(np.arange(len(train)), val_idx)
    logger.info(
        "No val/ folder in %s: holding out %d of %d train images (stratified, "
        "seed %d) as val",
        path,
        n_val,
        len(train),
        VAL_SEED,
    )
    return train.subset(train_idx), train.subset(val_idx)


def medmnist_root() -> Path:
    """Return the MedMNIST cache folder: $MEDMNIST_ROOT or ~/.medmnist."""
    return Path(os.environ.get("MEDMNIST_ROOT") or Path.home() / ".medmnist")


def resolve_data(
    path: str | None,
    *,
    image_size: int = 28,
    allow_download: bool = True,
    allow_synthetic_fallback: bool = False,
) -> XrayData:
    """Load data from data.path, else the MedMNIST cache or download.

    An explicit path never falls back. Without one, synthetic data is used only
    when ``allow_synthetic_fallback`` is set and no real data could be had. An
    empty string counts as unset, since TOML run configs have no null.
    """
    if path is not None and path.strip():
        return _load_path(path.strip(), image_size)
    root = medmnist_root()
    native = f"pneumoniamnist_{image_size}.npz" if image_size != 28 else MEDMNIST_FILE
    for name in dict.fromkeys([native, MEDMNIST_FILE]):
        if (root / name).is_file():
            return load_npz(root / name, image_size)
    reason = f"no {MEDMNIST_FILE} in {root}"
    if allow_download:
        try:
            return load_npz(_download_medmnist(root, image_size), image_size)
        except DataError as err:
            reason = f"{reason} and downloading it failed ({err})"
    if allow_synthetic_fallback:
        logger.warning(
            "USING SYNTHETIC DATA: %s. Metrics will mean nothing for pneumonia "
            "detection; set data.path to real data.",
            reason,
        )
        return make_synthetic(image_size=image_size)
    raise DataError(
        f"{reason}; {PATH_HINT}, put {MEDMNIST_FILE} in {root} (or set "
        "MEDMNIST_ROOT), or set data.path to 'synthetic' for toy data"
    )


def load_data(
    path: str | None,
    *,
    image_size: int = 28,
    limit: int | None = None,
    seed: int = 0,
    allow_synthetic_fallback: bool = False,
) -> XrayData:
    """Load the data (see ``resolve_data``) and cap every split at ``limit``.

    The cap keeps each split's class ratio and is drawn with ``seed``, so the
    server, the clients and centralized training see the same images.
    """
    data = resolve_data(
        path,
        image_size=image_size,
        allow_synthetic_fallback=allow_synthetic_fallback and not path,
    )
    check_both_classes(data)
    if limit is None:
        return data
    splits = {name: limit_split(s, limit, seed) for name, s in data.splits.items()}
    capped = XrayData(splits=splits, source=data.source, synthetic=data.synthetic)
    # A tiny cap can leave one class out although the data holds both.
    check_both_classes(capped, limit=limit)
    return capped


def check_both_classes(data: XrayData, limit: int | None = None) -> None:
    """Raise a DataError unless the train and val splits each hold both classes.

    With one class the loss has nothing to separate and val AUROC is undefined,
    so training would "succeed" at accuracy 1.0 and select no best model.
    """
    for name in ("train", "val"):
        split = data.splits.get(name)
        if split is None:
            continue
        counts = np.bincount(split.labels, minlength=len(CLASS_DIRS))
        if counts.min() > 0:
            continue
        after = f" after data.limit={limit}" if limit is not None else ""
        fix = "raise data.limit" if limit is not None else "add the missing class"
        raise DataError(
            f"the {name} split of '{data.source}' holds one class only{after} "
            f"({_class_counts(data.source, name, counts)}); training and selecting "
            "the best model by val AUROC need both NORMAL and PNEUMONIA images in "
            f"train and val, so {fix}"
        )


def _class_counts(source: str, name: str, counts: np.ndarray) -> str:
    # Name what the user can look at: class folders, or the .npz labels key.
    pairs = list(zip(CLASS_DIRS, counts.tolist(), strict=True))
    if (Path(source) / name).is_dir():
        return ", ".join(f"{name}/{cls}: {n} images" for cls, n in pairs)
    if Path(source).is_dir():
        held = ", ".join(f"{cls}: {n}" for cls, n in pairs)
        return f"{held} images held out from train/, as there is no {name}/ folder"
    return f"{name}_labels: " + ", ".join(
        f"{n} of label {label} ({cls})" for label, (cls, n) in enumerate(pairs)
    )


def _load_path(path: str, image_size: int, for_training: bool = True) -> XrayData:
    if path == SYNTHETIC:
        return make_synthetic(image_size=image_size)
    resolved = Path(path).expanduser()
    if resolved.is_dir():
        return load_image_folder(resolved, image_size, for_training=for_training)
    if resolved.is_file():
        return load_npz(resolved, image_size, for_training=for_training)
    raise DataError(f"data.path '{path}' does not exist; {PATH_HINT}")


def load_data_file(path: str, *, image_size: int = 28) -> XrayData:
    """Load the splits a file or folder holds, for scoring a saved model.

    Unlike ``resolve_data`` nothing is downloaded and no split is required:
    a file with only ``test_images``/``test_labels`` is enough.
    """
    return _load_path(path.strip(), image_size, for_training=False)


def _download_medmnist(root: Path, image_size: int) -> Path:
    size = image_size if image_size in MEDMNIST_SIZES else 28
    target = root / (MEDMNIST_FILE if size == 28 else f"pneumoniamnist_{size}.npz")
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading PneumoniaMNIST (size %d) to %s", size, root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        import medmnist  # imported late: importing it creates ~/.medmnist

        medmnist.PneumoniaMNIST(split="train", download=True, root=str(root), size=size)
    except (RuntimeError, OSError) as err:
        target.unlink(missing_ok=True)  # drop a partial download
        # medmnist re-raises every failure as a multi-line RuntimeError
        cause = err.__context__ or err
        raise DataError(f"{type(cause).__name__}: {cause}") from err
    finally:
        socket.setdefaulttimeout(previous)
    return target
