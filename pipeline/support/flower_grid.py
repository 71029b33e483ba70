"""An in-process Flower grid: every message goes straight to the real ClientApp of its node.

Used by the tests and the SecAgg+ benchmark to run the real ServerApp logic
(:func:`pipeline.federation.server_app.run_federation`) against the real ClientApp without
a SuperLink or Ray. Each node keeps its own context, as a SuperNode does (left unchanged
when the app raises, whose error becomes an error reply), and messages are copied as if
serialised, so nodes never share content. Every reply is kept with its size in bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from types import SimpleNamespace
from typing import cast

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from pipeline.contracts.messages import ARRAYS, PARTITION_ID, ROUND_KEY
from pipeline.federation.client_app import app as client_app


def payload_bytes(message: Message) -> int:
    """Bytes of array data and of bytes / string values in a message's records."""
    if message.has_error():
        return 0
    content = message.content
    size = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    records: list[ConfigRecord | MetricRecord] = [
        *content.config_records.values(),
        *content.metric_records.values(),
    ]
    for record in records:
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                size += len(item) if isinstance(item, (bytes, str)) else 8
    return size


class SimulatedDropout(RuntimeError):
    """A site failing mid-round (:class:`LoopbackGrid`'s ``dropouts``)."""


class LoopbackGrid(Grid):
    """Nodes ``first_node_id ...`` with ``partition-id`` 0 ... ``partitions - 1``.

    ``dropouts`` maps a round to the partitions that fail in it: their ClientApp raises when
    asked to train (after the SecAgg+ key exchange, so the protocol must recover their masks).
    """

    def __init__(
        self, partitions: int, first_node_id: int = 101, dropouts: Mapping[int, Collection[int]] | None = None
    ) -> None:
        self.dropouts = {int(r): set(p) for r, p in (dropouts or {}).items()}
        # Outside a Flower runtime, say which run this process serves (as a SuperLink does).
        for attribute in ("_task_id", "_run_id", "_node_id"):
            setattr(TaskIdentity, attribute, 1)
        self.contexts = {
            first_node_id + index: Context(
                run_id=1,
                node_id=first_node_id + index,
                node_config={PARTITION_ID: index},
                state=RecordDict(),
                run_config={},
            )
            for index in range(partitions)
        }
        self.replies: list[tuple[str, int, Message]] = []  # (message type, bytes, reply)

    def set_run(self, run: Run) -> None:
        """A loopback grid serves a single run."""

    @property
    def run(self) -> Run:
        return cast(Run, SimpleNamespace(run_id=1))  # run 1: its id is all a loopback run has

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError("build messages with flwr.app.Message")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message = copy.deepcopy(message)
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"{len(self.replies)}-{node}"
            context = copy.deepcopy(self.contexts[node])
            try:
                self._drop_out(message, context)
                reply = client_app(message, context)
                self.contexts[node] = context
            except Exception as error:  # noqa: BLE001 - a SuperNode reports any app failure
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(error)),
                    reply_to=message,
                )
            reply.metadata.__dict__["_src_node_id"] = node
            self.replies.append((message.metadata.message_type, payload_bytes(reply), reply))
            replies.append(reply)
        return replies

    def _drop_out(self, message: Message, context: Context) -> None:
        """Raise for the message that asks a dropping partition to train this round: the one with
        the model (under SecAgg+, the stage that collects the masked updates)."""
        if message.metadata.message_type != MessageType.TRAIN:
            return
        records = message.content.config_records
        if RECORD_KEY_CONFIGS in records:
            if records[RECORD_KEY_CONFIGS].get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
                return
        elif ARRAYS not in message.content:
            return
        rounds = [int(cast(int, r[ROUND_KEY])) for r in records.values() if ROUND_KEY in r]
        partition = int(cast(int, context.node_config[PARTITION_ID]))
        if rounds and partition in self.dropouts.get(rounds[0], ()):
            raise SimulatedDropout(f"partition {partition} drops out of round {rounds[0]}")
