"""Differential privacy: Flower's DP wrappers, the budget per round in SQL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from sqlalchemy import select

from client_app.app import app as client_app
from client_app.data import load_data
from persistence.db import dispose_engines, get_engine, session_scope
from persistence.models import PrivacySpent, Run
from server_app.privacy import default_delta
from tests.conftest import run_cli
from tests.loopback import LoopbackGrid
from tests.test_sessions import NUM_NODES, session


def expected_epsilons(
    noise: float, sampled: int, population: int, delta: float, rounds: int
) -> list[float]:
    """Epsilon after each round, from Flower's accountant fed the same events."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    epsilons = []
    for _ in range(rounds):
        accountant.compose(GaussianPrivacyEvent(noise, sampled, population))
        epsilons.append(accountant.get_privacy_spent().epsilon)
    return epsilons


def spent_rows(url: str) -> tuple[Run, list[PrivacySpent]]:
    with session_scope(get_engine(url)) as s:
        run = s.scalars(select(Run)).one()
        rows = s.scalars(select(PrivacySpent).order_by(PrivacySpent.round_number))
        return run, list(rows)


def test_default_delta_is_below_one_over_the_training_images() -> None:
    assert default_delta(4708) == 1e-4
    assert default_delta(1000) == 1e-4  # strictly below 1/1000
    assert default_delta(180) == 1e-3


def test_server_fixed_spends_flowers_epsilon_every_round(
    tmp_path: Path, data_file: Path
) -> None:
    url = session(tmp_path, data_file, "privacy=server_fixed", "num_rounds=3")
    run, rows = spent_rows(url)
    assert (run.status, run.privacy, run.stop_reason) == (
        "completed",
        "server_fixed",
        None,
    )
    train = len(load_data(str(data_file), limit=200, seed=42).split("train"))
    delta = run.config["privacy"]["delta"]
    assert delta == default_delta(train) < 1 / train  # stated in the config
    epsilons = [r.epsilon for r in rows]
    assert [r.round_number for r in rows] == [1, 2, 3]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    want = expected_epsilons(1.0, NUM_NODES, NUM_NODES, delta, 3)
    assert epsilons == pytest.approx(want, rel=1e-9)
    assert {(r.delta, r.noise_multiplier, r.clipping_norm) for r in rows} == {
        (delta, 1.0, 1.0)
    }
    assert [r.releases for r in rows] == [1, 2, 3]
    dispose_engines()


class RecordingGrid(LoopbackGrid):
    """The loopback grid, keeping each train message and the reply to it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.exchanges: list[tuple[Message, Message]] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for message, reply in zip(messages, replies, strict=True):
            if message.metadata.message_type == "train" and not reply.has_error():
                self.exchanges.append((message, reply))
        return replies


def update_norm(sent: Message, reply: Message) -> float:
    before = sent.content["arrays"].to_numpy_ndarrays()
    after = reply.content["arrays"].to_numpy_ndarrays()
    return math.sqrt(
        sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before, strict=True))
    )


def test_client_fixed_clips_each_update_on_the_client(
    tmp_path: Path, data_file: Path
) -> None:
    grid = RecordingGrid(client_app, NUM_NODES)
    url = session(
        tmp_path,
        data_file,
        "privacy=client_fixed",
        "privacy.clipping_norm=0.05",
        grid=grid,
    )
    run, rows = spent_rows(url)
    assert (run.status, run.privacy) == ("completed", "client_fixed")
    assert [r.round_number for r in rows] == [1, 2]
    # Every update the clients sent is within the clipping norm: Flower's
    # fixedclipping_mod ran on them (unclipped, one epoch moves far more).
    norms = [update_norm(sent, reply) for sent, reply in grid.exchanges]
    assert len(norms) == NUM_NODES * 2
    assert max(norms) <= 0.05 * (1 + 1e-5)
    assert min(norms) > 0.04  # clipped to the norm, not left near zero
    dispose_engines()


def test_a_budget_ends_the_run_completed_before_the_round_that_would_exceed_it(
    tmp_path: Path, data_file: Path
) -> None:
    # 200 training images: delta 1e-3; three releases reach epsilon 7.0.
    limit = 6.0
    url = session(
        tmp_path,
        data_file,
        "privacy=server_fixed",
        f"privacy.max_epsilon={limit}",
        "num_rounds=4",
    )
    run, rows = spent_rows(url)
    assert run.status == "completed" and run.error_message is None
    assert run.rounds_completed == 2
    assert [r.round_number for r in rows] == [1, 2]
    assert rows[-1].epsilon <= limit
    assert run.stop_reason.startswith(
        "privacy budget reached after round 2: round 3 would take epsilon from "
    )
    assert "past privacy.max_epsilon=6" in run.stop_reason
    assert Path(run.final_model_path).is_file()
    dispose_engines()


@pytest.mark.e2e
def test_fedpneumo_run_stops_at_the_budget_completed_and_exits_zero(
    tmp_path: Path, data_file: Path
) -> None:
    # 300 training images: delta 1e-3; 3 releases spend 7.00, a 4th 8.42.
    out = tmp_path / "out"
    result = run_cli(
        "run",
        f"data.path={data_file}",
        "data.limit=300",
        "model.width=8",
        "simulation.num_supernodes=3",
        "num_rounds=4",
        "privacy=server_fixed",
        "privacy.max_epsilon=7.5",
        f"outputs_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped:    privacy budget reached after round 3: round 4" in result.stdout
    run, rows = spent_rows(f"sqlite:///{out / 'fedpneumo.db'}")
    assert (run.status, run.rounds_completed) == ("completed", 3)
    assert run.stop_reason.startswith("privacy budget reached after round 3")
    # An epsilon for every round that ran, Flower's accountant's, under the limit.
    delta = run.config["privacy"]["delta"]
    assert delta == 1e-3
    want = expected_epsilons(1.0, 3, 3, delta, 3)
    assert [r.epsilon for r in rows] == pytest.approx(want, rel=1e-9)
    assert 0 < want[0] < want[1] < want[2] <= 7.5
    shown = runs_show(out, run.id)
    assert f"final epsilon {want[-1]:.4g} at delta 0.001" in shown
    dispose_engines()


def runs_show(out: Path, run_id: int) -> str:
    result = run_cli(
        "runs", "show", str(run_id), "--db", f"sqlite:///{out / 'fedpneumo.db'}"
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
