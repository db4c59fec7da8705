"""`fedpneumo run` / `fedpneumo resume`: validate, launch with Flower, summarise."""

from __future__ import annotations

import itertools
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedpneumo.flower import APP_DIR, FlowerOutcome
from fedpneumo.launcher import LocalSuperLink
from fedpneumo.progress import ProgressReporter
from persistence import repositories as repo
from persistence.db import get_engine, session_scope, upgrade_database
from persistence.models import Run, RunStatus
from server_app.compose import (
    config_from_snapshot,
    database_url,
    load_config,
    parse_overrides,
    resolve_paths,
)
from server_app.config import AppConfig, ConfigError
from server_app.events import ROUND_EVALUATED, parse_event

log = logging.getLogger(__name__)

# Overrides the launcher sets itself (absolute paths) or moves out of the
# run config (a URL may hold a password: it travels in the environment).
MANAGED_KEYS = {"outputs_dir", "data.path", "db.sqlite_path", "db.url"}


@dataclass
class SessionOutcome:
    """One federated session as the user sees it."""

    cfg: AppConfig
    flower: FlowerOutcome
    run: Run | None
    url: str
    # Seconds since submission at which each round's evaluation was reported
    # (round 0 = the initial model): start-up and per-round timings.
    round_times: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether Flower and the tracking database both say completed."""
        db_ok = self.run is None or self.run.status == RunStatus.COMPLETED
        return self.flower.completed and db_ok


def override_key(override: str) -> str:
    """Return the config key an override sets (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Expand Hydra sweep syntax (``a=1,2 b=x,y``) into one override list per run."""
    parsed = parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            key = text.split("=", 1)[0]
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(combo) for combo in itertools.product(*choices)]


def server_overrides(user: Sequence[str], cfg: AppConfig) -> str:
    """Return the overrides string for the ServerApp, with absolute paths."""
    kept = [o for o in user if override_key(o) not in MANAGED_KEYS]
    kept += [f"outputs_dir={cfg.outputs_dir}", f"db.sqlite_path={cfg.db.sqlite_path}"]
    if cfg.data.path:
        kept.append(f"data.path={cfg.data.path}")
    return shlex.join(kept)


def federation_config(cfg: AppConfig) -> str:
    """Return `flwr run --federation-config` for the simulation settings."""
    s = cfg.simulation
    parts = [
        f"num-supernodes={s.num_supernodes}",
        f"client-resources-num-cpus={s.client_num_cpus}",
        f"client-resources-num-gpus={s.client_num_gpus}",
    ]
    if s.num_cpus:
        parts.append(f"init-args-num-cpus={s.num_cpus}")
    return " ".join(parts)


def prepare(overrides: Sequence[str]) -> tuple[AppConfig, str]:
    """Compose and check everything that can fail before Flower starts."""
    cfg = resolve_paths(load_config(overrides))
    # Imported once the config is valid: a typo fails before torch and the
    # data stack load (about three seconds).
    from server_app.factories import check_partitions, configured_data

    data = configured_data(cfg, allow_synthetic_fallback=True)
    if data.synthetic and cfg.data.path is None:
        cfg.data.path = "synthetic"  # the loud fallback, recorded in the run
    data.split("val")
    check_partitions(cfg, data.split("train").labels)
    url = database_url(cfg) if cfg.tracking.enable_db else ""
    if url:
        upgrade_database(url)
    return cfg, url


def launch_env(url: str) -> dict[str, str]:
    """Return the environment for the SuperLink: this one plus DATABASE_URL."""
    env = dict(os.environ)
    if url and not url.startswith("sqlite"):
        env["DATABASE_URL"] = url
    return env


def find_run(url: str, flwr_run_id: int | None) -> Run | None:
    """Return the tracking run Flower's run created, if any."""
    if not url or flwr_run_id is None:
        return None
    from sqlalchemy import select

    with session_scope(get_engine(url)) as db:
        return db.scalars(
            select(Run).where(Run.flwr_run_id == str(flwr_run_id))
        ).one_or_none()


class StreamHandler:
    """Turn `flwr run --stream` lines into progress and a log file."""

    def __init__(self, reporter: ProgressReporter, logfile: Path, echo: bool) -> None:
        self.reporter = reporter
        self.logfile = logfile.open("a")
        self.echo = echo
        self.errors: list[str] = []
        self.started = time.monotonic()
        self.round_times: dict[int, float] = {}

    def __call__(self, line: str) -> None:
        """Handle one line of Flower's output."""
        self.logfile.write(line + "\n")
        self.logfile.flush()
        if self.echo:
            log.info("%s", line)
        event = parse_event(line)
        if event is not None and event["event"] == ROUND_EVALUATED:
            round_number = int(event["round"])
            self.round_times[round_number] = time.monotonic() - self.started
            self.reporter.advance(round_number, event.get("metrics", {}))
        elif "ERROR" in line or "Traceback" in line:
            self.errors.append(line)


def launch(
    cfg: AppConfig,
    url: str,
    run_config: dict[str, str | int],
    *,
    superlink: LocalSuperLink,
    echo: bool = False,
    start_round: int = 0,
) -> SessionOutcome:
    """Submit one session to the SuperLink and wait for its end."""
    logs = Path(cfg.outputs_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ProgressReporter("round", cfg.num_rounds, start=start_round) as reporter:
        handler = StreamHandler(reporter, logs / "flwr.log", echo)
        try:
            outcome = superlink.submit(run_config, federation_config(cfg), handler)
        except KeyboardInterrupt:
            _interrupted(superlink, url)
            raise
    run = find_run(url, outcome.flwr_run_id)
    return SessionOutcome(
        cfg=cfg, flower=outcome, run=run, url=url, round_times=handler.round_times
    )


def _interrupted(superlink: LocalSuperLink, url: str) -> None:
    """Ctrl-C: stop the Flower run and record the run as failed."""
    run_id = getattr(superlink, "flwr_run_id", None)
    if run_id is None:
        return
    superlink.stop_run(run_id)
    run = find_run(url, run_id)
    if run is not None and run.status == RunStatus.IN_PROGRESS:
        with session_scope(get_engine(url)) as db:
            repo.finish_run(
                db,
                run_id=run.id,
                status=RunStatus.FAILED,
                error_message="KeyboardInterrupt: interrupted by the user (Ctrl-C)",
            )
        where = f" --db {url}" if url.startswith("sqlite") else ""
        sys.stderr.write(
            f"interrupted: run {run.id} marked failed after {run.rounds_completed} "
            f"rounds; `fedpneumo resume {run.id}{where}` continues it\n"
        )


def run_sessions(
    overrides: Sequence[str],
    *,
    multirun: bool,
    echo: bool,
    app_dir: Path = APP_DIR,
) -> list[SessionOutcome]:
    """Run one session, or one per combination of a sweep, on one SuperLink."""
    combos = expand_sweep(overrides) if multirun else [list(overrides)]
    prepared = [(combo, *prepare(combo)) for combo in combos]
    outcomes = []
    cwd = Path.cwd()
    url0 = prepared[0][2]
    with LocalSuperLink(launch_env(url0), cwd, app_dir) as superlink:
        for combo, cfg, url in prepared:
            if url != url0:
                raise ConfigError("a sweep must use one tracking database (db.*)")
            run_config: dict[str, str | int] = {
                "overrides": server_overrides(combo, cfg),
                "resume-run-id": 0,
            }
            outcomes.append(
                launch(cfg, url, run_config, superlink=superlink, echo=echo)
            )
    return outcomes


def resume_session(
    run_id: int,
    url: str,
    *,
    echo: bool,
    force: bool = False,
    app_dir: Path = APP_DIR,
) -> SessionOutcome:
    """Continue a federated run from its last completed round."""
    from fedpneumo.reports import is_stale
    from server_app.runs import resumable_run

    upgrade_database(url)
    with session_scope(get_engine(url)) as db:
        run = resumable_run(db, run_id)
        if run.status == RunStatus.IN_PROGRESS and not force and not is_stale(run):
            raise ConfigError(
                f"run {run_id} is still in progress (pid {run.pid} on {run.host}); "
                "wait for it or stop it first (--force overrides this check)"
            )
        snapshot_cfg = dict(run.config or {})
        done = run.rounds_completed
    current = load_config([])
    if url.startswith("sqlite"):
        current.db.sqlite_path = url.removeprefix("sqlite:///")
    cfg = config_from_snapshot(snapshot_cfg, current)
    overrides = [
        f"outputs_dir={cfg.outputs_dir}",
        f"db.sqlite_path={cfg.db.sqlite_path}",
    ]
    with LocalSuperLink(launch_env(url), Path.cwd(), app_dir) as superlink:
        return launch(
            cfg,
            url,
            {"overrides": shlex.join(overrides), "resume-run-id": run_id},
            superlink=superlink,
            echo=echo,
            start_round=done,
        )
