"""Server-side evaluation of the global model, model checkpoints and round state."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from client_app.data import Split
from client_app.metric_keys import SERVER_EVAL_KEYS, THRESHOLD
from client_app.trainer import evaluate, load_checkpoint, save_checkpoint
from server_app.config import AppConfig
from server_app.events import emit_round
from server_app.recorder import RunRecorder
from server_app.round_state import ROUND_STATE, save_round_state

log = logging.getLogger(__name__)

BEST_MODEL = "best_model.pt"
FINAL_MODEL = "final_model.pt"


class ServerEvaluator:
    """The ``evaluate_fn`` of ``Strategy.start``: score, record, checkpoint."""

    def __init__(
        self,
        cfg: AppConfig,
        model: torch.nn.Module,
        val: Split,
        recorder: RunRecorder,
        run_dir: Path,
        meta: dict[str, Any],
        *,
        round_offset: int = 0,
        best_auroc: float = -math.inf,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.val = val
        self.recorder = recorder
        self.run_dir = run_dir
        self.meta = meta
        self.round_offset = round_offset
        self.best_auroc = best_auroc
        self.strategy: Any = None
        self.history: dict[int, dict[str, float]] = {}
        # The last global model evaluated: the final one when a run stops early.
        self.last_arrays: ArrayRecord | None = None
        # The last round scored, its metrics and seconds (see ``score``).
        self._scored: tuple[int, dict[str, float], float] | None = None

    def score(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Score a round's global model on val, once per round.

        The strategy asks first (hospitals need the round's threshold before
        Flower calls ``evaluate_fn``); the second call reuses the score.
        """
        if self._scored is None or self._scored[0] != server_round:
            started = time.perf_counter()
            self.model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(self.model, self.val, device=str(self.cfg.train.device))
            self._scored = (server_round, metrics, time.perf_counter() - started)
        return self._scored[1]

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model after ``server_round`` (0 = initial)."""
        round_number = server_round + self.round_offset
        if server_round == 0 and self.round_offset > 0:
            return None  # the initial model was evaluated before the resume
        # self.model holds this round's weights from here on (score loaded them).
        metrics = self.score(server_round, arrays)
        self.last_arrays = arrays
        assert self._scored is not None
        seconds = self._scored[2]
        self.history[round_number] = metrics
        self.recorder.record_evaluation(round_number, metrics, seconds)
        auroc = metrics["auroc"]
        if not math.isnan(auroc) and auroc > self.best_auroc:
            self.best_auroc = auroc
            path = save_checkpoint(
                self.run_dir / BEST_MODEL,
                self.model,
                threshold=metrics["threshold"],
                meta={**self.meta, "round": round_number},
            )
            self.recorder.update(checkpoint_path=str(path))
        if server_round > 0:
            extra = {
                "best_auroc": self.best_auroc,
                "strategy_state": self.strategy.state() if self.strategy else {},
            }
            save_round_state(self.run_dir / ROUND_STATE, arrays, round_number, extra)
            self.recorder.update(rounds_completed=round_number)
        emit_round(round_number, self.cfg.num_rounds, metrics)
        self.recorder.check_outage(round_number)
        return MetricRecord(
            {k: float(metrics[k]) for k in (*SERVER_EVAL_KEYS, THRESHOLD)}
        )

    def score_test(self, test: Split | None) -> dict[str, float] | None:
        """Score the best-by-val model once on the test split, with its val threshold.

        Nothing here selects anything: the model and threshold were fixed on
        val. Returns None when there is no test split or no kept model.
        """
        best = self.run_dir / BEST_MODEL
        if test is None or not len(test):
            log.info(
                "no test split in the data: nothing is claimed about test performance"
            )
            return None
        if not best.is_file():
            log.warning("no best model was kept (no val AUROC): test not scored")
            return None
        state = load_checkpoint(best)
        self.model.load_state_dict(state["state_dict"])
        metrics = evaluate(
            self.model,
            test,
            threshold=float(state["threshold"]),
            device=str(self.cfg.train.device),
        )
        round_number = int(state.get("round", 0))
        self.recorder.record_test(round_number, metrics)
        log.info(
            "test split (%d images), model of round %d: AUROC %.4f, accuracy %.4f",
            len(test),
            round_number,
            metrics["auroc"],
            metrics["accuracy"],
        )
        return metrics

    def save_final(self, arrays: ArrayRecord) -> Path:
        """Save the final global model with its own val threshold."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        if self.history:
            last = max(self.history)
            threshold = self.history[last]["threshold"]
        else:  # nothing evaluated in this session (a resumed, finished run)
            last = self.round_offset
            device = str(self.cfg.train.device)
            threshold = evaluate(self.model, self.val, device=device)["threshold"]
        return save_checkpoint(
            self.run_dir / FINAL_MODEL,
            self.model,
            threshold=threshold,
            meta={**self.meta, "round": last},
        )
