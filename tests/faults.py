"""Build the test-only fault app (``tests/faultapp``) with a fault spec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "faultapp"


def fault_app(
    folder: Path,
    *,
    clients: list[tuple[int, int]] = (),  # type: ignore[assignment]
    server_round: int | None = None,
) -> Path:
    """Copy the fault app to folder with its spec; return the app folder.

    Args:
        folder: Where the app goes (created).
        clients: (partition id, round) pairs whose training raises.
        server_round: The round whose sending makes the ServerApp raise.
    """
    app = folder / "faultapp"
    shutil.copytree(TEMPLATE, app, ignore=shutil.ignore_patterns("__pycache__"))
    spec = {"clients": [list(c) for c in clients], "server_round": server_round}
    (app / "fault_spec.json").write_text(json.dumps(spec))
    return app
