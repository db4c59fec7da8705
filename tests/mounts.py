"""Real read-only and full file systems for tests (small tmpfs mounts).

The suite runs as root, which ignores file permissions; only a read-only
mount or a full one refuses a write to root. Mounting needs CAP_SYS_ADMIN,
which the test machine and CI have; without it these fixtures fail loudly.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


@contextmanager
def tmpfs(folder: Path, size: str = "1m") -> Iterator[Path]:
    """Mount an empty tmpfs of ``size`` at folder for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextmanager
def read_only(folder: Path, files: dict[str, bytes] | None = None) -> Iterator[Path]:
    """A read-only folder holding ``files`` (name -> bytes) for the block."""
    with tmpfs(folder, "64m"):
        for name, content in (files or {}).items():
            (folder / name).write_bytes(content)
        _mount("-o", "remount,ro", str(folder))
        yield folder


def fill(folder: Path) -> None:
    """Write into folder until its file system has no space left."""
    fh = (folder / ".filler").open("ab", buffering=0)
    try:
        while True:
            fh.write(b"\0" * 4096)
    except OSError:
        pass  # no space left: the point
    finally:
        fh.close()


@contextmanager
def full(folder: Path) -> Iterator[Path]:
    """A folder on a file system with no space left, for the block."""
    with tmpfs(folder, "64k"):
        fill(folder)
        yield folder


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on a read-only file system."""
    with read_only(tmp_path / "read-only") as folder:
        yield folder


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on a file system that is full."""
    with full(tmp_path / "full") as folder:
        yield folder
