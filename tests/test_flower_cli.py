"""The README's `flwr run .` instructions, run as written against Flower's own
local SuperLink: the run completes, a federation of the wrong size fails
within seconds with the fix in the message, and the README's stop command
stops the SuperLink."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from persistence.db import get_engine, session_scope
from persistence.models import Run
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

README = (REPO_ROOT / "README.md").read_text()


def readme_block(starting: str) -> str:
    """The README's shell command that starts with ``starting`` (joined lines)."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith(starting):
                return line.strip()
    raise AssertionError(f"no `{starting}` command in README.md")


def superlinks(home: Path) -> list[psutil.Process]:
    """Flower's local SuperLink processes of one FLWR_HOME."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(home) in cmdline:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def flower_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A FLWR_HOME of its own; the test stops its SuperLink as the README says."""
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    for proc in superlinks(home):  # only if the README's command did not
        proc.kill()


def flwr_run(
    home: Path, federation: str, overrides: str
) -> subprocess.CompletedProcess[str]:
    """Run the README's `flwr run .` with another size and overrides."""
    command = readme_block("flwr run .")
    assert '--stream --federation-config "num-supernodes=10"' in command
    args = shlex.split(command)
    args[args.index("--federation-config") + 1] = federation
    args[-1] = f'overrides="{overrides}"'
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
    }
    args[0] = str(Path(bin_dir) / "flwr")
    return subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400
    )


def test_readme_flwr_run_works_and_a_wrong_size_fails_with_the_fix(
    flower_home: Path, tmp_path: Path, data_file: Path
) -> None:
    db = tmp_path / "tracking.db"
    overrides = (
        f"data.path={data_file} data.limit=300 model.width=8 num_rounds=1 "
        f"simulation.num_supernodes=3 outputs_dir={tmp_path} db.sqlite_path={db} "
        "strategy=fedprox partition.alpha=0.4"
    )
    done = flwr_run(flower_home, "num-supernodes=3", overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with session_scope(get_engine(f"sqlite:///{db}")) as s:
        runs = s.scalars(select(Run)).all()
        assert [(r.strategy, r.status, r.rounds_completed) for r in runs] == [
            ("fedprox", "completed", 1)
        ]
        assert runs[0].partition == "dirichlet(alpha=0.4)"
        assert runs[0].config["partition"]["alpha"] == 0.4

    started = time.monotonic()
    wrong = flwr_run(flower_home, "num-supernodes=2", overrides)
    output = wrong.stdout + wrong.stderr
    assert time.monotonic() - started < 60, output[-3000:]
    assert (
        "simulation.num_supernodes=3 but the federation has 2 SuperNodes; start it "
        'with `flwr run . --federation-config "num-supernodes=3"`, or pass '
        "simulation.num_supernodes=2 in the overrides"
    ) in output, output[-3000:]
    with session_scope(get_engine(f"sqlite:///{db}")) as s:
        assert len(s.scalars(select(Run)).all()) == 1  # no Run for a failed start

    assert superlinks(flower_home), "Flower's local SuperLink should still run"
    stop = readme_block("pkill -f")
    env = {**os.environ, "FLWR_HOME": str(flower_home)}
    subprocess.run(["bash", "-c", stop], env=env, check=False)
    deadline = time.monotonic() + 15
    while superlinks(flower_home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not superlinks(flower_home)
