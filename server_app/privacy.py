"""Differential privacy: Flower's DP wrappers, and the budget spent per round.

``wrap`` puts the configured ``DifferentialPrivacy*`` wrapper of Flower around
the tracked strategy. ``PrivacyLedger`` keeps Flower's RDP accountant
(``flwr.supercore.privacy_accounting``, Google's dp-accounting underneath):
one Gaussian release per round that produced a global model, at the run's
delta, client-level, add-or-remove-one neighbours and no amplification by
sampling (epsilon is an upper bound whatever ``strategy.fraction_train`` is).
No privacy arithmetic is done here: noise, clipping and epsilon are Flower's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from server_app.choices import PrivacyMode
from server_app.config import (
    AppConfig,
    ConfigError,
    PrivacySettings,
    sampled_clients,
)

log = logging.getLogger(__name__)

WRAPPERS = {
    PrivacyMode.server_fixed: DifferentialPrivacyServerSideFixedClipping,
    PrivacyMode.client_fixed: DifferentialPrivacyClientSideFixedClipping,
    PrivacyMode.server_adaptive: DifferentialPrivacyServerSideAdaptiveClipping,
    PrivacyMode.client_adaptive: DifferentialPrivacyClientSideAdaptiveClipping,
}
ADAPTIVE = (PrivacyMode.server_adaptive, PrivacyMode.client_adaptive)


class PrivacyBudgetReached(Exception):
    """The next round would spend more than privacy.max_epsilon: the run ends.

    Not an error: the run is complete as far as its budget allows.
    """


def default_delta(num_train_images: int) -> float:
    """Return the largest power of ten strictly below 1 / training images."""
    exponent = math.floor(math.log10(1.0 / num_train_images))
    delta = 10.0**exponent
    return delta / 10 if delta >= 1.0 / num_train_images else delta


def check_budget(cfg: AppConfig, num_train_images: int) -> None:
    """Refuse a budget that a single round already exceeds (nothing would train).

    Raises:
        ConfigError: privacy.max_epsilon is below one round's epsilon.
    """
    p = cfg.privacy
    if p.mode == PrivacyMode.none or p.max_epsilon is None:
        return
    delta = p.delta or default_delta(num_train_images)
    population = cfg.simulation.num_supernodes
    ledger = PrivacyLedger(replace(p, delta=delta, max_epsilon=None), population)
    ledger.accountant.compose(
        GaussianPrivacyEvent(p.noise_multiplier, sampled_clients(cfg), population)
    )
    one_round = ledger.accountant.get_privacy_spent().epsilon
    if one_round > p.max_epsilon:
        raise ConfigError(
            f"privacy.max_epsilon={p.max_epsilon:g} is below what one round spends "
            f"({one_round:.4g} at delta {delta:g} with privacy.noise_multiplier="
            f"{p.noise_multiplier:g}): the run would train nothing; raise "
            "privacy.max_epsilon or privacy.noise_multiplier"
        )


class PrivacyLedger:
    """Flower's RDP accountant for one run, fed one event per released round."""

    def __init__(self, settings: PrivacySettings, population: int) -> None:
        assert settings.delta is not None, "resolve privacy.delta first"
        self.noise_multiplier = settings.noise_multiplier
        # Fixed modes clip at one norm; the adaptive ones move it every round.
        self.clipping_norm = (
            None if settings.mode in ADAPTIVE else settings.clipping_norm
        )
        self.max_epsilon = settings.max_epsilon
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=settings.delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=settings.max_epsilon,
            )
        )
        self._pending: tuple[int, GaussianPrivacyEvent] | None = None
        self.sampled = 0

    def before_round(self, round_number: int, sampled: int) -> None:
        """Check the budget before a round's models are sent out.

        Raises:
            PrivacyBudgetReached: releasing this round's model would take
                epsilon past privacy.max_epsilon.
        """
        event = GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_size=sampled,
            population_size=self.accountant.config.population_size,
        )
        if self.max_epsilon is not None and self.accountant.would_exceed(event):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetReached(
                f"privacy budget reached after round {round_number - 1}: round "
                f"{round_number} would take epsilon from {spent.epsilon:.4g} past "
                f"privacy.max_epsilon={self.max_epsilon:g} (delta {spent.delta:g})"
            )
        self._pending = (round_number, event)
        self.sampled = sampled

    def released(self, round_number: int) -> PrivacySpent:
        """Compose the round's release; return the budget spent so far."""
        assert self._pending and self._pending[0] == round_number, round_number
        self.accountant.compose(self._pending[1])
        self._pending = None
        return self.accountant.get_privacy_spent()

    def row(self, spent: PrivacySpent) -> dict[str, Any]:
        """Return the ``privacy_spent`` columns of a round's budget."""
        return {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "releases": spent.num_releases,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "sampled_clients": self.sampled,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the accountant's state (plain values, for the round checkpoint)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (a resumed run spends from there on)."""
        self.accountant.load_state_dict(state)


class PrivateRounds:
    """Hooks of a DP wrapper around the tracked strategy (``wrap``).

    Every reply is recorded first. Flower's wrappers calibrate the noise to
    the sampled number of clients, so a round in which any sampled client
    failed or did not answer is skipped: no model is released, no epsilon
    spent.
    """

    strategy: Any

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies, then let Flower clip, average and add noise."""
        replies = list(replies)
        ok = self.strategy.account_replies(server_round, replies)
        if len(ok) < self.strategy.sampled:
            log.warning(
                "round %d skipped: %d of %d sampled clients replied, and the DP "
                "noise is calibrated to all of them",
                server_round + self.strategy.round_offset,
                len(ok),
                self.strategy.sampled,
            )
            return None, None
        return super().aggregate_train(server_round, ok)  # type: ignore[misc]

    def state(self) -> dict[str, Any]:
        """Return the wrapped strategy's state, with an adaptive clipping norm."""
        state = dict(self.strategy.state())
        if hasattr(self, "target_clipped_quantile"):
            state["dp_clipping_norm"] = float(self.clipping_norm)  # type: ignore[attr-defined]
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Restore state saved by ``state``."""
        state = dict(state)
        norm = state.pop("dp_clipping_norm", None)
        if norm is not None:
            self.clipping_norm = norm
        self.strategy.restore(state)


def wrap(cfg: AppConfig, tracked: Any, sampled: int) -> Any:
    """Return the strategy Flower runs: ``tracked``, in its DP wrapper if any."""
    p = cfg.privacy
    if p.mode == PrivacyMode.none:
        return tracked
    base = WRAPPERS[p.mode]
    wrapper = type(f"Tracked{base.__name__}", (PrivateRounds, base), {})
    if p.mode in ADAPTIVE:
        return wrapper(
            tracked,
            p.noise_multiplier,
            sampled,
            initial_clipping_norm=p.initial_clipping_norm,
            target_clipped_quantile=p.target_clipped_quantile,
            clip_norm_lr=p.clip_norm_lr,
            clipped_count_stddev=p.clipped_count_stddev,
        )
    return wrapper(tracked, p.noise_multiplier, p.clipping_norm, sampled)
