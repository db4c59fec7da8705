"""A Flower Grid whose nodes are fedpneumo's real ClientApp, called in-process.

``run_session`` (the ServerApp's whole session) runs against it unchanged:
the strategy samples nodes, sends real Messages, and each one is handled by
the production ``client_app.app.app`` with a node Context like a SuperNode's.
Only the transport is left out, so a session takes seconds, not a Ray start.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242


class LoopbackGrid(Grid):
    """Deliver every message to a ClientApp in this process, node by node."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(range(101, 101 + num_nodes))
        }

    def set_run(self, run: object) -> None:  # noqa: D102 - not used in-process
        raise NotImplementedError

    @property
    def run(self) -> object:  # noqa: D102 - not used in-process
        raise NotImplementedError

    def create_message(  # noqa: D102 - strategies build Messages themselves
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Handle each message with the ClientApp; a raise becomes an error reply."""
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                replies.append(self.app(message, context))
            except Exception as exc:  # noqa: BLE001 - as a SuperNode reports it
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc))
                replies.append(Message(error, reply_to=message))
        return replies


@contextmanager
def serverapp_identity() -> Iterator[None]:
    """Give this process the ServerApp identity Flower's runtime would set."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
