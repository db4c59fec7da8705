"""Flower's own strategies, extended through their narrow hooks only.

``make_strategy`` subclasses the configured ``flwr.serverapp.strategy`` class
with ``TrackingMixin``, which adds the run id and training settings to every
round's config, records each client's reply and failure, continues round
numbers after a resume, and fails the run when too few clients reply. Its
evaluate hooks have each sampled hospital score the round's global model with
the server's val threshold, and record every hospital's score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from client_app.messages import (
    EVAL_THRESHOLD,
    INFO_RECORD,
    NUM_EXAMPLES,
    RELAY_RECORD,
    decode_relay_rows,
)
from client_app.trainer import lr_at
from persistence.entries import HospitalScore
from persistence.errors import FailedRunError
from server_app.config import AppConfig, sampled_clients, strategy_class
from server_app.evaluate import ServerEvaluator
from server_app.privacy import PrivacyLedger
from server_app.recorder import RunRecorder, concise_reason

log = logging.getLogger(__name__)

# Cross-round state of Flower's strategies (FedOpt family, FedAvgM), saved in
# round checkpoints so that a resumed run continues the same optimisation.
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")
# The privacy accountant's state in the same checkpoint: a resumed run goes
# on spending from where the interrupted one stopped.
PRIVACY_STATE = "privacy_accountant"


class TooFewRepliesError(FailedRunError):
    """Fewer clients replied in a round than the run needs."""


def nan_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each metric over clients, skipping NaN values.

    A client with a one-class validation slice has no AUROC; it should not
    turn the round's aggregate into NaN.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weight_key])
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list):
                continue
            if not math.isnan(float(value)):
                totals[key] = totals.get(key, 0.0) + weight * float(value)
                weights[key] = weights.get(key, 0.0) + weight
    keys = {k for r in records for k in next(iter(r.metric_records.values()))}
    return MetricRecord(
        {
            k: totals[k] / weights[k] if weights.get(k) else math.nan
            for k in sorted(keys - {weight_key})
        }
    )


class TrackingMixin:
    """Hooks around a Flower strategy; see the module docstring."""

    recorder: RunRecorder
    round_offset: int
    train_settings: dict[str, Any]
    min_success_fraction: float
    client_of_node: dict[int, str]
    sampled: int
    evaluator: ServerEvaluator | None = None
    privacy: PrivacyLedger | None = None
    # Hospitals evaluate every k-th round (set by make_strategy).
    evaluate_every: int = 1
    # The round whose replies a DP wrapper has already recorded (see privacy.py).
    accounted_round: int | None = None
    # Flower's own attribute (FedAvg): 0 turns federated evaluation off.
    fraction_evaluate: float

    def attach(
        self,
        recorder: RunRecorder,
        train_settings: dict[str, Any],
        *,
        round_offset: int = 0,
        min_success_fraction: float = 0.5,
        lr_schedule: str = "constant",
        num_rounds: int = 1,
        evaluator: ServerEvaluator | None = None,
        privacy: PrivacyLedger | None = None,
    ) -> None:
        """Connect the strategy to this run's recorder, settings and evaluator.

        ``evaluator`` scores the global model on val before the hospitals do,
        so they receive that round's threshold; without it, or with
        ``fraction_evaluate`` 0, hospitals do not evaluate. ``privacy`` checks
        the budget before each round and accounts each released model.
        """
        self.recorder = recorder
        self.evaluator = evaluator
        self.privacy = privacy
        self.train_settings = train_settings
        self.lr_schedule = lr_schedule
        self.num_rounds = num_rounds
        self.round_offset = round_offset
        self.min_success_fraction = min_success_fraction
        self.client_of_node = {}
        # Clients sampled in the current round (set by configure_train).
        self.sampled = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the run id, the (continued) round and the training settings."""
        round_number = server_round + self.round_offset
        for key, value in self.train_settings.items():
            config[key] = value
        config["lr"] = lr_at(
            self.train_settings["lr"], self.lr_schedule, round_number, self.num_rounds
        )
        config["server-round"] = round_number
        messages = list(
            super().configure_train(round_number, arrays, config, grid)  # type: ignore[misc]
        )
        # Flower stamps its own round counter; clients must see the continued one.
        config["server-round"] = round_number
        self.sampled = len(messages)
        if self.privacy is not None:
            self.privacy.before_round(round_number, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record every reply (rows, failures), then aggregate as Flower does.

        Under differential privacy every client weighs the same (Flower's
        noise covers a uniform mean) and each released model is accounted.
        """
        round_number = server_round + self.round_offset
        replies = list(replies)
        if self.accounted_round == server_round:
            ok = replies  # recorded by the DP wrapper before it clipped them
        else:
            ok = self.account_replies(server_round, replies)
        self.accounted_round = None
        if self.privacy is None:
            arrays, metrics = super().aggregate_train(round_number, ok)  # type: ignore[misc]
        else:
            arrays, metrics = self._uniform_mean(round_number, ok)
        if metrics is not None:
            self.recorder.record_aggregate(round_number, dict(metrics))
        if arrays is not None and self.privacy is not None:
            spent = self.privacy.released(round_number)
            self.recorder.record_privacy(round_number, self.privacy.row(spent))
        return arrays, metrics

    def _uniform_mean(
        self, round_number: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the updates with equal weights (the DP noise covers that mean).

        The metrics keep their example weights, as in every other run, so the
        aggregates of private and non-private runs compare.
        """
        records = [next(iter(m.content.metric_records.values())) for m in replies]
        weights = [record[NUM_EXAMPLES] for record in records]
        for record in records:
            record[NUM_EXAMPLES] = 1
        arrays, _ = super().aggregate_train(round_number, replies)  # type: ignore[misc]
        for record, weight in zip(records, weights, strict=True):
            record[NUM_EXAMPLES] = weight
        metrics = self.train_metrics_aggr_fn(  # type: ignore[attr-defined]
            [m.content for m in replies], NUM_EXAMPLES
        )
        return arrays, metrics

    def account_replies(
        self, server_round: int, replies: list[Message]
    ) -> list[Message]:
        """Record each reply's rows or failure; return the successful ones.

        Raises:
            TooFewRepliesError: fewer than strategy.min_success_fraction of the
                sampled clients replied.
        """
        round_number = server_round + self.round_offset
        self.accounted_round = server_round
        ok = [m for m in replies if not m.has_error()]
        for message in replies:
            if message.has_error():
                node = message.metadata.src_node_id
                self.recorder.record_failure(
                    round_number,
                    node,
                    concise_reason(message.error.reason),
                    self.client_of_node.get(node),
                )
            else:
                self._record_reply(message)
        # Clients that never answered (timeouts) count as missing replies too.
        sampled = max(self.sampled, len(replies))
        needed = max(1, math.ceil(self.min_success_fraction * sampled))
        if len(ok) < needed:
            failed = [
                f"{self._client_name(m)} ({concise_reason(m.error.reason)})"
                for m in replies
                if m.has_error()
            ]
            raise TooFewRepliesError(
                f"round {round_number}: only {len(ok)} of {sampled} clients "
                f"replied (need {needed}); failed: {'; '.join(failed)}"
            )
        return ok

    def _client_name(self, message: Message) -> str:
        node = message.metadata.src_node_id
        return self.client_of_node.get(node, f"node {node}")

    def _record_reply(self, message: Message) -> None:
        info = message.content.config_records.get(INFO_RECORD)
        if info is None:
            return
        node = message.metadata.src_node_id
        identifier = str(info["client-identifier"])
        self.client_of_node[node] = identifier
        relay = message.content.config_records.get(RELAY_RECORD)
        if relay is not None:
            self.recorder.record_client_rows(
                decode_relay_rows(relay),
                client_identifier=identifier,
                partition_id=int(info["partition-id"]),
                node_id=node,
                num_examples=int(info["num-examples"]),
            )

    def evaluates(self, round_number: int) -> bool:
        """Whether hospitals score the global model after this round."""
        if self.evaluator is None or not self.fraction_evaluate:
            return False
        last = round_number == self.num_rounds
        return last or round_number % self.evaluate_every == 0

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model, the client settings and the server's threshold.

        The server scores the round's model on val first (``evaluate_fn``
        reuses that score), so every hospital cuts at the same threshold.
        """
        round_number = server_round + self.round_offset
        if not self.evaluates(round_number):
            return []
        assert self.evaluator is not None
        metrics = self.evaluator.score(server_round, arrays)
        for key, value in self.train_settings.items():
            config[key] = value
        config[EVAL_THRESHOLD] = float(metrics["threshold"])
        return super().configure_evaluate(  # type: ignore[misc]
            round_number, arrays, config, grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each hospital's score (or failure), then aggregate as Flower does."""
        round_number = server_round + self.round_offset
        replies = list(replies)
        scores = []
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                self.recorder.record_failure(
                    round_number,
                    node,
                    "evaluation: " + concise_reason(message.error.reason),
                    self.client_of_node.get(node),
                )
                continue
            info = message.content.config_records[INFO_RECORD]
            identifier = str(info["client-identifier"])
            self.client_of_node[node] = identifier
            metrics = next(iter(message.content.metric_records.values()))
            scores.append(
                HospitalScore(
                    client_identifier=identifier,
                    metrics={
                        k: float(v) for k, v in metrics.items() if k != NUM_EXAMPLES
                    },
                    partition_id=int(info["partition-id"]),
                    node_id=str(node),
                    num_examples=int(info["num-examples"]),
                )
            )
        self.recorder.record_client_evaluations(round_number, scores)
        return super().aggregate_evaluate(round_number, replies)  # type: ignore[misc]

    def state(self) -> dict[str, Any]:
        """Return the strategy's cross-round state (plain values and arrays)."""
        state = {
            name: getattr(self, name)
            for name in STATE_ATTRIBUTES
            if getattr(self, name, None) is not None
        }
        if self.privacy is not None:
            state[PRIVACY_STATE] = self.privacy.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Restore state saved by ``state``."""
        state = dict(state)
        accountant = state.pop(PRIVACY_STATE, None)
        if accountant is not None and self.privacy is not None:
            self.privacy.load_state_dict(accountant)
        for name, value in state.items():
            setattr(self, name, value)


def make_strategy(cfg: AppConfig, num_nodes: int) -> Any:
    """Instantiate the configured Flower strategy with tracking hooks."""
    base = strategy_class(cfg.strategy.name)
    tracked = type(f"Tracked{base.__name__}", (TrackingMixin, base), {})
    sampled = sampled_clients(cfg, num_nodes)
    evaluation = cfg.evaluation
    fraction_evaluate = evaluation.fraction if evaluation.federated else 0.0
    strategy = tracked(
        fraction_train=cfg.strategy.fraction_train,
        # Hospitals score each round's model on their held-out slices; the
        # server scores it on val (evaluate_fn) whatever this says.
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=sampled,
        min_evaluate_nodes=math.ceil(fraction_evaluate * num_nodes),
        min_available_nodes=num_nodes,
        train_metrics_aggr_fn=nan_weighted_mean,
        evaluate_metrics_aggr_fn=nan_weighted_mean,
        **cfg.strategy.params,
    )
    strategy.evaluate_every = evaluation.every
    return strategy
