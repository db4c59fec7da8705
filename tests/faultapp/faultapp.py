"""fedpneumo's ServerApp and ClientApp, with faults injected for tests.

``fault_spec.json`` beside this file says where: ``{"clients": [[partition,
round], ...]}`` makes those clients' training raise in those rounds (a Flower
mod), and
``{"server_round": N}`` makes the ServerApp raise when it sends round N.
The production handlers run unchanged inside these wrappers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client_app.app import evaluate_global, label_counts, train
from server_app.federation import run_session

SPEC_FILE = Path(__file__).with_name("fault_spec.json")
SPEC: dict[str, Any] = json.loads(SPEC_FILE.read_text())


def failing_clients(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Raise in the training the spec names; else run the handler."""
    server_round = int(msg.content["config"]["server-round"])
    partition_id = int(context.node_config["partition-id"])
    training = msg.metadata.message_type == "train"
    if training and [partition_id, server_round] in SPEC.get("clients", []):
        raise RuntimeError(
            f"injected fault: client {partition_id} fails round {server_round}"
        )
    return call_next(msg, context)


client = ClientApp(mods=[failing_clients])
client.train()(train)
client.evaluate()(evaluate_global)
client.query()(label_counts)
server = ServerApp()


def failing_at_round(grid: Grid, fail_round: int) -> Grid:
    """Make the grid raise when the ServerApp sends round ``fail_round``."""
    send_and_receive = grid.send_and_receive

    def send(messages: Iterable[Message], **kwargs: Any) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            config = message.content.config_records.get("config", {})
            if config.get("server-round") == fail_round:
                raise RuntimeError(f"injected server fault in round {fail_round}")
        return send_and_receive(messages, **kwargs)

    grid.send_and_receive = send  # type: ignore[method-assign]
    return grid


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run fedpneumo's session, failing where the spec says."""
    fail_round = SPEC.get("server_round")
    run_session(failing_at_round(grid, fail_round) if fail_round else grid, context)
