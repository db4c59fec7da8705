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
from client_app.trainer import evaluate, save_checkpoint
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

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model after ``server_round`` (0 = initial)."""
        round_number = server_round + self.round_offset
        if server_round == 0 and self.round_offset > 0:
            return None  # the initial model was evaluated before the resume
        started = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(self.model, self.val, device=str(self.cfg.train.device))
        seconds = time.perf_counter() - started
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

    def save_final(self, arrays: ArrayRecord) -> Path:
        """Save the final global model with its own val threshold."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        last = max(self.history) if self.history else 0
        threshold = self.history.get(last, {}).get("threshold", 0.5)
        return save_checkpoint(
            self.run_dir / FINAL_MODEL,
            self.model,
            threshold=threshold,
            meta={**self.meta, "round": last},
        )
