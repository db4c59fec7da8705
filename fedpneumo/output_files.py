"""Write a command's output file whole or not at all.

``runs plot`` and ``runs export`` write files the user names. A folder that
does not exist, a read-only or full file system must end in one clear error
line and must not leave a truncated file behind: the content goes to a hidden
file beside the target first, which replaces the target only once complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from persistence.errors import InputError


def check_output_folder(path: Path, option: str = "--output") -> None:
    """Raise InputError unless the folder that is to hold ``path`` exists.

    Called before any work, so that a typo in the path fails at once; the
    folder is never created, as a typo would then make deep paths silently.
    """
    # "", "." and "/" have no file name: the temp file beside them cannot be
    # named, and an existing folder would only fail at the final rename.
    if path.name in ("", ".", "..") or _is_dir(path):
        raise InputError(
            f"{option} {str(path)!r} is a folder, not a file; give the path of "
            "a file to write (in an existing folder)"
        )
    folder = path.parent
    if not folder.exists():
        raise InputError(
            f"{option} {path}: folder {folder} does not exist; "
            "create it first or give a path in an existing folder"
        )
    if not folder.is_dir():
        raise InputError(
            f"{option} {path}: {folder} is not a folder; "
            "give a path inside an existing folder"
        )


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False  # a name too long, say: the write reports it


def write_atomically(
    path: Path, write: Callable[[BinaryIO], object], option: str = "--output"
) -> None:
    """Write ``path`` with ``write(fh)``: the whole file appears, or none does.

    Raises:
        InputError: the folder is missing or the file cannot be written there
            (read-only file system, no space left, a folder of that name, ...).
    """
    check_output_folder(path, option)
    # Same folder as the target: os.replace is then an atomic rename.
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as fh:
            write(fh)
        os.replace(temp, path)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise InputError(
            f"{option} {path} cannot be written ({reason}); "
            "give a path in a writable folder"
        ) from None
    finally:
        # Whatever failed (the file system, or the writer itself), no
        # partial file stays behind; after os.replace there is nothing left.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
