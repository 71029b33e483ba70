"""Grids that wrap the one Flower hands the ServerApp: a base that delegates every call
(:class:`DelegatingGrid`), and :class:`PromptGrid`, which collects replies as they arrive.

Flower 1.41's deployment grid asks the SuperLink for replies every 3 s, so a stage whose
replies are ready waits 1.5 s on average, at every stage of every round (five stages a round
under SecAgg+). :class:`PromptGrid` asks every :data:`REPLY_POLL_S` (a cheap call on the
SuperLink's own API), and pulls a reply's parts that are still arriving promptly
(:mod:`pipeline.contracts.transfer`). It packs the arrays of every message it sends and unpacks
every reply (:mod:`pipeline.contracts.packing`), as the sites do, and sends a site a reference
instead of packed arrays that the site's last reply says it holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.superlink.grid import http_grid

from pipeline.contracts.messages import SITE, SITE_NAME
from pipeline.contracts.packing import NOT_HELD, Reuse, held_by, pack, packed, refers, unpacked
from pipeline.contracts.transfer import PROMPT_PULLS

REPLY_POLL_S = 0.1

log = logging.getLogger("fedrad.federation")


class DelegatingGrid(Grid):
    """A grid that hands every call to ``grid``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


def _prompt_pull_objects(object_ids: list[str], pull_object_fn, **_flower_defaults) -> dict[str, bytes]:
    return pull_objects(object_ids, pull_object_fn, **PROMPT_PULLS)


class PromptGrid(DelegatingGrid):
    """Sends like Flower's grid, its messages' arrays packed, and collects the replies every
    :data:`REPLY_POLL_S`, unpacked, their parts asked for again as promptly as
    :data:`PROMPT_PULLS` says (Flower 1.41's deployment grid has no setting for it: its module's
    ``pull_objects`` is replaced in this process).

    A site whose last reply says it holds the packed arrays of a message is sent a reference to
    them instead; a site that answers that it does not hold them (it restarted since) is sent the
    message again with the bytes, within the same :meth:`send_and_receive`."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        http_grid.pull_objects = _prompt_pull_objects
        self.held: dict[int, str] = {}  # by site (node id): the packed arrays its last reply holds
        self.names: dict[int, str] = {}  # by node id: the name a site's replies give

    def _push(self, messages: Iterable[Message]) -> tuple[list[str], dict[str, Message]]:
        """Push ``messages`` packed; their ids, and by id the same message with its bytes for
        each one sent as a reference (a site's holding is used once)."""
        messages = list(messages)  # the ids below stay valid while they are held
        reuse: Reuse = {}  # the same global model to every site: packed once
        with_bytes: list[Message | None] = []
        for message in messages:
            meta = message.metadata
            content = message.content if message.has_content() else None
            packed(message, reuse, self.held.pop(meta.dst_node_id, None))
            again = None
            if content is not None and refers(message):
                full = pack(content, reuse)
                again = Message(full, meta.dst_node_id, meta.message_type, group_id=meta.group_id)
            with_bytes.append(again)
        ids = list(self.grid.push_messages(messages))
        return ids, {i: again for i, again in zip(ids, with_bytes, strict=True) if again is not None}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._push(messages)[0]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            node, held = reply.metadata.src_node_id, held_by(reply)
            if held is not None:
                self.held[node] = held
            if reply.has_content() and SITE in reply.content.config_records:
                self.names[node] = str(reply.content.config_records[SITE].get(SITE_NAME, node))
        return [unpacked(reply) for reply in replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids, with_bytes = self._push(messages)
        waiting = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(waiting):
                answered = reply.metadata.reply_to_message_id
                waiting.discard(answered)
                again = with_bytes.pop(answered, None)
                if again is not None and reply.has_error() and NOT_HELD in (reply.error.reason or ""):
                    name = self.names.get(again.metadata.dst_node_id, again.metadata.dst_node_id)
                    log.warning("site %s no longer held the model referred to: sent again", name)
                    waiting |= set(self.grid.push_messages([again]))
                else:
                    replies.append(reply)
            if waiting:
                time.sleep(REPLY_POLL_S)
        return replies
