"""`fedpneumo ui` as a real process, and headless Chromium to look at it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedpneumo.flower import free_port, kill_tree

CHROMIUM = "/usr/bin/chromium"
# Headless, as root, on a machine without network: no sandbox, no background
# traffic, no first-run or update work.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@contextmanager
def dashboard(url: str, *extra: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Serve `fedpneumo ui --db url` on a free port; yield its address and process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpneumo", "ui", "--db", url, "--port", str(port)]
        + list(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{address}/static/dashboard.css", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    output = proc.stdout.read() if proc.stdout else ""
                    raise RuntimeError(
                        f"fedpneumo ui did not start: {output}"
                    ) from None
                time.sleep(0.2)
        yield address, proc
    finally:
        kill_tree(proc.pid)


def save_screenshot(page: object, path: Path) -> Path:
    """Screenshot the whole page; also copy it to $UI_SCREENSHOT_DIR if set.

    The README's screenshots are made that way: UI_SCREENSHOT_DIR=docs.
    """
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    folder = os.environ.get("UI_SCREENSHOT_DIR")
    if folder:
        shutil.copy(path, Path(folder) / path.name)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's package), driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()
