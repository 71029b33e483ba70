"""A message's parts still arriving are asked for again promptly, at a site taking a message
from its SuperNode and at the coordinator collecting a reply (pipeline.contracts.transfer)."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import context_to_proto, message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import http_grid

from pipeline.contracts.transfer import PULL_BACKOFF_CAP_S
from pipeline.deployment.warm_runtime import pull_message
from pipeline.federation.grids import DelegatingGrid, PromptGrid

ARRIVES_AFTER_S = 1.0


class SlowSuperNode:
    """A SuperNode's Runtime API whose message parts become available ARRIVES_AFTER_S after
    the first request for them."""

    def __init__(self, message: Message) -> None:
        self.tree = get_object_tree(message)
        self.objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
        self.header = message_to_proto(remove_content_from_message(message))
        self.first_ask: float | None = None
        self.asked = 0

    def PullTaskInput(self, _request):
        context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
        response = PullTaskInputResponse(task_id=11, context=context_to_proto(context))
        response.run.run_id = 7
        return response

    def PullMessages(self, _request):
        return PullAppMessagesResponse(messages_list=[self.header], message_object_trees=[self.tree])

    def PullObject(self, request):
        self.asked += 1
        self.first_ask = self.first_ask or time.monotonic()
        if time.monotonic() - self.first_ask < ARRIVES_AFTER_S:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(
            object_found=True, object_available=True, object_content=self.objects[request.object_id]
        )

    def ConfirmMessageReceived(self, _request):
        return ConfirmMessageReceivedResponse()


def _model_message() -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 11, 0
    arrays = ArrayRecord({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)})
    return Message(RecordDict({"arrays": arrays}), dst_node_id=3, message_type="train")


def test_a_site_asks_again_promptly_for_a_message_still_arriving():
    sent = _model_message()
    supernode = SlowSuperNode(sent)
    started = time.monotonic()
    message, context = pull_message(supernode)
    waited = time.monotonic() - started
    assert message.content["arrays"].to_torch_state_dict()["w"].equal(torch.arange(12.0).reshape(3, 4))
    assert message.metadata.message_id == sent.object_id and context.node_id == 3
    # Flower's default asks again after 1 s, then 2 s: the message would be taken after about 3 s.
    assert waited < ARRIVES_AFTER_S + 2 * PULL_BACKOFF_CAP_S + 0.5, waited
    assert supernode.asked >= 2 * len(supernode.objects)


def test_the_coordinator_pulls_replies_with_the_same_prompt_retries():
    PromptGrid(DelegatingGrid(None))  # type: ignore[arg-type]
    asked: list[float] = []

    def unavailable_once(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) == 1:
            raise ObjectUnavailableError(object_id)
        return b"part"

    assert http_grid.pull_objects(object_ids=["a"], pull_object_fn=unavailable_once) == {"a": b"part"}
    assert asked[1] - asked[0] < 0.5  # Flower's default: 1 s +- 20%
