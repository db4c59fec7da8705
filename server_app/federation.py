"""One federated session: open the Run, run Flower's strategy, close the Run."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid

from client_app.data import XrayData
from client_app.messages import COUNTS_RECORD
from client_app.trainer import pos_weight_from_counts, seed_everything
from persistence.db import mask_url, upgrade_database
from persistence.errors import FailedRunError
from persistence.models import RunStatus
from server_app.choices import PrivacyMode
from server_app.compose import (
    config_from_message,
    database_url,
    load_config,
    resolve_paths,
)
from server_app.config import AppConfig, ConfigError, partition_label
from server_app.evaluate import ServerEvaluator
from server_app.factories import (
    build_model,
    check_partitions,
    configured_data,
    instructions,
    model_meta,
)
from server_app.privacy import (
    PrivacyBudgetReached,
    PrivacyLedger,
    check_budget,
    default_delta,
    wrap,
)
from server_app.recorder import RunRecorder, concise_reason
from server_app.resources import check_outputs
from server_app.runs import open_run, resume_state
from server_app.strategy import make_strategy

log = logging.getLogger(__name__)

NODE_WAIT_S = 60.0
# No SuperNode joined for this long: the federation is as big as it gets. A
# simulation registers all its SuperNodes at once; deployed ones join as they
# start, within seconds of each other.
NODE_SETTLE_S = 15.0
ROUND_TIMEOUT_S = 3600.0


def setup_logging() -> None:
    """Show this project's INFO logs in the run's log stream (once each).

    The handler sits on our own loggers, not the root: Flower's logger also
    propagates to the root, and a root handler would print its lines twice.
    """
    for name in ("fedpneumo", "server_app", "client_app", "persistence"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(h, "_fedpneumo", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(levelname)s %(name)s: %(message)s")
            )
            handler._fedpneumo = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False


def wait_for_nodes(
    grid: Grid,
    expected: int,
    timeout_s: float = NODE_WAIT_S,
    settle_s: float = NODE_SETTLE_S,
) -> int:
    """Wait until the configured number of SuperNodes is connected.

    Fails once the count has not grown for ``settle_s`` (a federation that
    is smaller than configured, say Flower's default of 2 SuperNodes), or
    after ``timeout_s``, with the setting to change.
    """
    deadline = time.monotonic() + timeout_s
    seen, changed = -1, time.monotonic()
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            if connected > expected:
                log.warning(
                    "%d SuperNodes connected, simulation.num_supernodes=%d",
                    connected,
                    expected,
                )
            return connected
        now = time.monotonic()
        if connected != seen:
            seen, changed = connected, now
        if now > deadline or (connected > 0 and now - changed > settle_s):
            raise ConfigError(
                f"simulation.num_supernodes={expected} but the federation has "
                f"{connected} SuperNodes; start it with `flwr run . --federation-"
                f'config "num-supernodes={expected}"`, or pass '
                f"simulation.num_supernodes={connected} in the overrides"
            )
        time.sleep(1.0)


def prepare_session(
    context: Context,
) -> tuple[AppConfig, str | None, dict[str, Any], Any]:
    """Compose the config (or the resumed run's), check it, load the data.

    Returns the config, the database URL (None without tracking), the resumed
    round state (empty for a new run) and the loaded data.
    """
    resume_id = int(context.run_config.get("resume-run-id", 0))
    # `fedpneumo run` sends the config it composed and checked moments ago
    # (same data, same partitions, database migrated): composing and checking
    # it again would delay round 1 by a second. A plain `flwr run .` sends
    # overrides, and gets every check here.
    composed = str(context.run_config.get("config", ""))
    prechecked = bool(composed)
    if composed:
        cfg = config_from_message(composed)
    else:
        overrides = str(context.run_config.get("overrides", ""))
        cfg = resolve_paths(load_config(overrides))
    check_outputs(cfg)
    url = database_url(cfg) if cfg.tracking.enable_db else None
    if url and not prechecked:
        upgrade_database(url)
    state: dict[str, Any] = {}
    if resume_id:
        if not url:
            raise ConfigError(
                "resuming needs the tracking database (tracking.enable_db)"
            )
        cfg, state = resume_state(url, resume_id, cfg)
    data = configured_data(cfg)
    if not prechecked:
        check_partitions(cfg, data.split("train").labels)
    return cfg, url, state, data


def run_session(grid: Grid, context: Context) -> None:
    """Run one federated session against exactly one Run row."""
    setup_logging()
    cfg, url, state, data = prepare_session(context)
    if cfg.privacy.mode != PrivacyMode.none and cfg.privacy.delta is None:
        # Stated in the run's config snapshot, so the epsilon is reproducible.
        cfg.privacy.delta = default_delta(len(data.split("train")))
    check_budget(cfg, len(data.split("train")))
    num_nodes = wait_for_nodes(grid, cfg.simulation.num_supernodes)
    resume_id = int(context.run_config.get("resume-run-id", 0))
    if url and resume_id:
        run_id = resume_id
    elif url:
        extra = {"synthetic": data.synthetic, "data_source": data.source}
        run_id = open_run(cfg, url, context, extra)
    else:
        run_id = 0
    run_dir = Path(cfg.outputs_dir) / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(url, run_id, run_dir, cfg.tracking.outage_timeout_s)
    recorder.start_heartbeat()
    log.info(
        "federated run %d (%s) on %s: %s, %s, %d clients, rounds %d..%d",
        run_id,
        "resumed" if resume_id else "new",
        mask_url(url) if url else "no database",
        cfg.strategy.name,
        partition_label(cfg),
        num_nodes,
        int(state.get("round", 0)) + 1,
        cfg.num_rounds,
    )
    try:
        _train(cfg, grid, recorder, run_dir, data, num_nodes, state, url)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        recorder.close(RunStatus.FAILED, reason)
        log.error("federated run %d failed: %s", run_id, reason)
        raise
    if recorder.close(RunStatus.COMPLETED):
        log.info("federated run %d completed", run_id)
    else:
        log.error(
            "federated run %d trained every round, but the tracking database is "
            "unreachable: its rows and status wait under %s for `fedpneumo sync`",
            run_id,
            run_dir,
        )


def global_pos_weight(
    grid: Grid,
    config: dict[str, Any],
    timeout_s: float = ROUND_TIMEOUT_S,
    meanwhile: Callable[[], object] | None = None,
) -> float | None:
    """Ask every client for its training label counts; return negatives/positives.

    Only counts leave the hospitals. A client that cannot answer is left out
    (it would fail its rounds too); with no answer at all the run fails.
    ``meanwhile`` runs on a worker thread while the clients answer.
    """
    messages = [
        Message(
            RecordDict({"config": ConfigRecord(config)}),
            dst_node_id=node_id,
            message_type=MessageType.QUERY,
        )
        for node_id in grid.get_node_ids()
    ]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(meanwhile) if meanwhile is not None else None
        replies = list(grid.send_and_receive(messages, timeout=timeout_s))
        if pending is not None:
            pending.result()
    counts = [r.content[COUNTS_RECORD] for r in replies if not r.has_error()]
    if not counts:
        reasons = "; ".join(concise_reason(r.error.reason) for r in replies)
        raise FailedRunError(f"no client reported its label counts: {reasons}")
    negatives = sum(int(c["negatives"]) for c in counts)
    positives = sum(int(c["positives"]) for c in counts)
    log.info(
        "label counts from %d of %d clients: %d negative, %d positive",
        len(counts),
        len(messages),
        negatives,
        positives,
    )
    return pos_weight_from_counts(negatives, positives)


def _train(
    cfg: AppConfig,
    grid: Grid,
    recorder: RunRecorder,
    run_dir: Path,
    data: XrayData,
    num_nodes: int,
    state: dict[str, Any],
    url: str | None,
) -> None:
    seed_everything(cfg.seed)
    model = build_model(cfg)
    offset = int(state.get("round", 0))
    if state:
        model.load_state_dict(state["state_dict"])
    evaluator = ServerEvaluator(
        cfg,
        model,
        data.split("val"),
        recorder,
        run_dir,
        model_meta(cfg),
        round_offset=offset,
        best_auroc=float(state.get("best_auroc", -math.inf)),
    )
    # The final model until a round is evaluated: what a resumed run starts
    # from, or all a private run has when no round released a model.
    evaluator.last_arrays = ArrayRecord(model.state_dict())
    if offset < cfg.num_rounds:
        _run_rounds(cfg, grid, recorder, evaluator, num_nodes, state, url)
    # else every round ran before: nothing to train, the run completes.
    final = evaluator.save_final(evaluator.last_arrays)
    recorder.update(final_model_path=str(final))
    evaluator.score_test(data.splits.get("test"))


def _run_rounds(
    cfg: AppConfig,
    grid: Grid,
    recorder: RunRecorder,
    evaluator: ServerEvaluator,
    num_nodes: int,
    state: dict[str, Any],
    url: str | None,
) -> None:
    """Run the remaining rounds with the configured (and DP-wrapped) strategy."""
    offset = evaluator.round_offset
    ins = instructions(cfg, recorder.run_id, url)
    if cfg.train.class_weighting:
        # Flower scores the initial model before round 1. Scored while the
        # clients count their labels (the first message of a simulation waits
        # for Ray to start), Flower's call reuses that score.
        initial = evaluator.last_arrays if offset == 0 else None
        pos_weight = global_pos_weight(
            grid,
            ins.to_config(),
            meanwhile=None if initial is None else lambda: evaluator.score(0, initial),
        )
        ins = replace(ins, pos_weight=pos_weight or 0.0)
    strategy = make_strategy(cfg, num_nodes)
    runner = wrap(cfg, strategy, strategy.min_train_nodes)
    privacy = (
        PrivacyLedger(cfg.privacy, population=num_nodes)
        if cfg.privacy.mode != PrivacyMode.none
        else None
    )
    evaluator.strategy = runner
    strategy.attach(
        recorder,
        ins.to_config(),
        round_offset=offset,
        min_success_fraction=cfg.strategy.min_success_fraction,
        lr_schedule=str(cfg.train.lr_schedule),
        num_rounds=cfg.num_rounds,
        evaluator=evaluator,
        privacy=privacy,
    )
    if state.get("strategy_state"):
        runner.restore(state["strategy_state"])
    assert evaluator.last_arrays is not None
    try:
        runner.start(
            grid,
            evaluator.last_arrays,
            num_rounds=cfg.num_rounds - offset,
            timeout=ROUND_TIMEOUT_S,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluator,
        )
    except PrivacyBudgetReached as stop:
        # The run is complete as far as its budget allows: not a failure.
        log.info("federated run %d stopped: %s", recorder.run_id, stop)
        recorder.update(stop_reason=str(stop))
