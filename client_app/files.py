"""Files written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write data to path through a temp file and a rename; no half file remains.

    The temp file is named after this process, so two processes writing the
    same file never rename each other's half-written bytes into place.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
