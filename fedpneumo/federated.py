"""`fedpneumo run` / `fedpneumo resume`: validate, launch with Flower, summarise."""

from __future__ import annotations

import collections
import itertools
import logging
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from fedpneumo.flower import APP_DIR, FlowerOutcome
from fedpneumo.launcher import LocalSuperLink, launch_env
from fedpneumo.progress import ProgressReporter
from persistence import repositories as repo
from persistence.db import (
    describe_error,
    get_engine,
    session_scope,
    upgrade_database,
)
from persistence.errors import DatabaseError
from persistence.models import Run, RunStatus
from server_app.compose import (
    config_from_snapshot,
    config_message,
    database_url,
    first_line,
    load_config,
    mask_override,
    parse_overrides,
    resolve_paths,
)
from server_app.config import AppConfig, ConfigError
from server_app.events import (
    ROUND_EVALUATED,
    TRACKING_DOWN,
    TRACKING_PENDING,
    TRACKING_UP,
    parse_event,
)
from server_app.recorder import concise_reason
from server_app.resources import check_compute, check_outputs

log = logging.getLogger(__name__)

# Lines of Flower's output that may carry the cause of a crash.
ERROR_HINT = re.compile(r"Error|Exception|Traceback")


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
    # Set when the run ended while the database was down (its status and
    # rows wait in the spool): the TRACKING_PENDING event's fields.
    pending: dict | None = None
    # Why the tracking database could not be read after the run, if it could not.
    db_error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether Flower and the tracking database both say completed."""
        if self.pending or self.db_error:
            return False
        db_ok = self.run is None or self.run.status == RunStatus.COMPLETED
        return self.flower.completed and db_ok

    def problem(self) -> str:
        """One line saying why the session is not ``ok``."""
        if self.pending:
            return pending_message(self.pending, self.url)
        if self.db_error:
            return f"the run's status is unknown: {self.db_error}"
        reason = (self.run.error_message if self.run else None) or self.flower.details
        label = (
            f"run {self.run.id}"
            if self.run
            else f"Flower run {self.flower.flwr_run_id}"
        )
        return f"federated {label} failed: {reason}"


def sync_command(run_dir: str, url: str) -> str:
    """Return the ``fedpneumo sync`` command for a run folder and database."""
    # A SQLite path is safe to print; a server URL may hold a password, and
    # the user has it in DATABASE_URL already.
    db = f" --db {url}" if url.startswith("sqlite") else ""
    return f"fedpneumo sync --outputs {shlex.quote(run_dir)}{db}"


def pending_message(event: dict, url: str) -> str:
    """Explain a run whose status waits in the spool, with the sync command."""
    return (
        f"run {event['run_id']} ended ({event['status']}) while the tracking "
        f"database was unreachable; its status and {event['pending']} spooled "
        f"batches are kept under {event['spool']}: run "
        f"`{sync_command(str(event['spool']), url)}` when the database is back"
    )


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Expand Hydra sweep syntax (``a=1,2 b=x,y``) into one override list per run."""
    parsed = parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        if not override.is_sweep_override():
            choices.append([text])
            continue
        key = text.split("=", 1)[0]
        try:
            values = list(override.sweep_string_iterator())
        except Exception as exc:  # Hydra raises many types for odd sweeps
            raise ConfigError(
                f"cannot expand the sweep {mask_override(text)!r} "
                f"({first_line(exc)}); list the values: {key}=a,b,c"
            ) from None
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)]


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


def prepare(cfg: AppConfig) -> str:
    """Check everything about a composed config that can fail before Flower starts.

    Sets ``data.path`` to ``synthetic`` when the data is that fallback. Returns
    the migrated database's URL ('' with tracking off).
    """
    check_compute(cfg)
    check_outputs(cfg)
    # Imported once the config is valid: a typo fails before torch and the
    # data stack load (about three seconds).
    from server_app.factories import check_partitions, configured_data

    data = configured_data(cfg, allow_synthetic_fallback=True)
    if data.synthetic and cfg.data.path is None:
        cfg.data.path = "synthetic"  # the loud fallback, recorded in the run
    data.split("val")
    check_partitions(cfg, data.split("train").labels)
    from server_app.privacy import check_budget

    check_budget(cfg, len(data.split("train")))
    url = database_url(cfg) if cfg.tracking.enable_db else ""
    if url:
        upgrade_database(url)
    return url


def new_session_config(cfg: AppConfig) -> dict[str, str | int]:
    """Return the Flower run config of a new session that ``prepare`` checked.

    The ServerApp gets the composed config itself: it neither loads Hydra nor
    composes again, and it runs exactly what was checked here (absolute paths,
    a SQLite ``db.url``; a server URL travels as DATABASE_URL).
    """
    return {"config": config_message(cfg), "resume-run-id": 0}


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
        self.started = time.monotonic()
        self.round_times: dict[int, float] = {}
        self.pending: dict | None = None
        # The tail of Flower's output: where the cause of a crash is found.
        self.tail: collections.deque[str] = collections.deque(maxlen=400)

    def __call__(self, line: str) -> None:
        """Handle one line of Flower's output."""
        self._log(line)
        self.tail.append(line)
        if self.echo:
            log.info("%s", line)
        event = parse_event(line)
        kind = event["event"] if event else None
        if kind == ROUND_EVALUATED:
            round_number = int(event["round"])
            self.round_times[round_number] = time.monotonic() - self.started
            self.reporter.advance(round_number, event.get("metrics", {}))
        elif kind == TRACKING_DOWN:
            log.warning(
                "tracking database unreachable (%s): training goes on, metrics "
                "are spooled under %s; the run stops after %g s of outage",
                event.get("detail"),
                event.get("spool"),
                float(event.get("timeout_s", 0)),
            )
        elif kind == TRACKING_UP:
            log.info("tracking database reachable again: spooled metrics written")
        elif kind == TRACKING_PENDING:
            self.pending = event

    def _log(self, line: str) -> None:
        if self.logfile is None:
            return
        try:
            self.logfile.write(line + "\n")
            self.logfile.flush()
        except OSError as exc:
            # A full or vanished outputs disk must not stop following the run.
            log.warning(
                "cannot write %s (%s); not logging Flower's output",
                self.logfile.name,
                exc.strerror,
            )
            self.logfile = None


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
    session = SessionOutcome(
        cfg=cfg,
        flower=outcome,
        run=None,
        url=url,
        round_times=handler.round_times,
        pending=handler.pending,
    )
    try:
        session.run = find_run(url, outcome.flwr_run_id)
        if not outcome.completed and session.run is not None:
            session.run = close_abandoned(session.run, url, handler)
    except (DBAPIError, DatabaseError) as exc:
        # Down, or refusing writes (a SQLite file on a full disk): say so.
        session.db_error = describe_error(exc, url)
    return session


def close_abandoned(run: Run, url: str, handler: StreamHandler) -> Run:
    """Mark failed a run Flower ended while the ServerApp could not close it.

    A crash of Flower's simulation runtime (say, no Ray worker fits the
    requested resources) kills the ServerApp without running its own error
    handling; the cause is only in Flower's output.
    """
    if run.status != RunStatus.IN_PROGRESS or handler.pending:
        return run
    errors = [ln for ln in handler.tail if ERROR_HINT.search(ln)]
    reason = (
        concise_reason("\n".join(errors))
        if errors
        else "no error in its log; Flower's simulation process may have been "
        "killed (out of memory?)"
    )
    with session_scope(get_engine(url)) as db:
        return repo.finish_run(
            db,
            run_id=run.id,
            status=RunStatus.FAILED,
            error_message=f"Flower ended the run: {reason}",
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
    superlink: LocalSuperLink,
) -> list[SessionOutcome]:
    """Run one session, or one per combination of a sweep, on one SuperLink.

    ``superlink`` was started before this module loaded (``launch_env()``'s
    environment): it boots while the configs are composed and checked here,
    and restarts only if they need another environment.
    """
    combos = expand_sweep(overrides) if multirun else [list(overrides)]
    # Every combination valid before any creates a database.
    configs = [resolve_paths(load_config(combo)) for combo in combos]
    cfg0 = configs[0]
    url0 = database_url(cfg0) if cfg0.tracking.enable_db else ""
    # One SuperLink serves the whole sweep, with one environment.
    if any(
        (database_url(cfg) if cfg.tracking.enable_db else "") != url0 for cfg in configs
    ):
        raise ConfigError("a sweep must use one tracking database (db.*)")
    if len({cfg.simulation.ray_address for cfg in configs}) > 1:
        raise ConfigError("a sweep must use one Ray cluster (simulation.ray_address)")
    superlink.use_env(launch_env(url0, cfg0.simulation.ray_address))
    # Checked while the SuperLink starts: a failure stops it unused.
    urls = [prepare(cfg) for cfg in configs]
    return [
        launch(cfg, url, new_session_config(cfg), superlink=superlink, echo=echo)
        for cfg, url in zip(configs, urls, strict=True)
    ]


def _existing_database(url: str) -> None:
    """Refuse to resume against a SQLite file that does not exist (never create one)."""
    if not url.startswith("sqlite"):
        return
    from persistence.db import check_sqlite_path

    path = check_sqlite_path(url, create_folder=False)
    if path is None or not path.is_file():
        raise DatabaseError(
            f"database file {path} does not exist; give the run's database with "
            "--db (or --outputs for the folder holding fedpneumo.db)"
        )


def _check_alive(run: Run, force: bool) -> None:
    from fedpneumo.reports import is_stale

    if run.status == RunStatus.IN_PROGRESS and not force and not is_stale(run):
        raise ConfigError(
            f"run {run.id} is still in progress (pid {run.pid} on {run.host}); "
            "wait for it or stop it first (--force overrides this check)"
        )


def finish_if_done(run_id: int, url: str, *, force: bool = False) -> Run | None:
    """Replay a run's spools; complete it if every round already ran.

    Returns the run when it is completed (before or now), None when rounds
    are left to train. A run that ended while the database was down has its
    rows and status in its spools: they are written first, so nothing is
    trained twice and a fully trained run is never marked failed. A run that
    looks alive is left alone unless ``force``.
    """
    from persistence.spool import sync
    from server_app.round_state import ROUND_STATE, load_round_state

    _existing_database(url)
    upgrade_database(url)
    with session_scope(get_engine(url)) as db:
        run = repo.require_run(db, run_id)
        _check_alive(run, force)
    outputs = Path(run.outputs_path) if run.outputs_path else None
    if outputs is not None and outputs.is_dir():
        files, stored, _ = sync(url, outputs)
        if files:
            log.info(
                "run %d: %d spooled batches written (%d new rows)",
                run_id,
                files,
                stored,
            )
    with session_scope(get_engine(url)) as db:
        run = repo.require_run(db, run_id)
        if run.status == RunStatus.COMPLETED or run.training_mode != "federated":
            return run if run.status == RunStatus.COMPLETED else None
        state = outputs / ROUND_STATE if outputs is not None else None
        done = run.rounds_completed
        if state is not None and state.is_file():
            done = max(done, int(load_round_state(state)["round"]))
        if done < run.num_rounds:
            return None
        repo.update_run(db, run_id=run_id, rounds_completed=run.num_rounds)
        return repo.finish_run(db, run_id=run_id, status=RunStatus.COMPLETED)


def resume_session(
    run_id: int,
    url: str,
    *,
    echo: bool,
    force: bool = False,
    app_dir: Path = APP_DIR,
) -> SessionOutcome:
    """Continue a federated run from its last completed round.

    Everything that can refuse the resume (a live run, a missing or foreign
    round checkpoint, weights of another model) is checked here, before
    Flower starts and before any row is deleted.
    """
    from server_app.runs import checked_round_state, resumable_run

    with session_scope(get_engine(url)) as db:
        run = resumable_run(db, run_id)
        _check_alive(run, force)
        snapshot_cfg = dict(run.config or {})
        done = run.rounds_completed
        outputs = run.outputs_path
    current = load_config([])
    if url.startswith("sqlite"):
        current.db.sqlite_path = url.removeprefix("sqlite:///")
    cfg = config_from_snapshot(snapshot_cfg, current)
    checked_round_state(cfg, Path(outputs or ""), run_id)
    overrides = [
        f"outputs_dir={cfg.outputs_dir}",
        f"db.sqlite_path={cfg.db.sqlite_path}",
    ]
    check_compute(cfg)
    env = launch_env(url, cfg.simulation.ray_address)
    with LocalSuperLink(env, Path.cwd(), app_dir) as superlink:
        return launch(
            cfg,
            url,
            {"overrides": shlex.join(overrides), "resume-run-id": run_id},
            superlink=superlink,
            echo=echo,
            start_round=done,
        )
