"""A deployed message's arrays travel packed into one byte array (pipeline.contracts.packing):
exactly what was sent arrives, in a tenth of the objects, and a layout that does not
account for its bytes is refused; a model the site holds already is sent as a reference."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.message_pb2 import PushObjectResponse
from flwr.proto.runtime_pb2 import PushAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from models.resnet import resnet18
from pipeline.contracts.messages import HOLDS, PACKED, PACKING
from pipeline.contracts.packing import (
    HeldArrays,
    PackingError,
    digest,
    held_by,
    holding,
    pack,
    packed,
    unpack,
    unpacked,
)
from pipeline.deployment import warm_runtime
from pipeline.deployment.warm_runtime import pull_message
from pipeline.federation.grids import DelegatingGrid, PromptGrid
from tests.test_transfer import SlowSuperNode


def trained_resnet_message() -> Message:
    """A training reply as a site sends it: every tensor distinct (as after training), the
    batch-norm counters int64, the site's metrics and config beside the model."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 11, 0
    torch.manual_seed(0)
    state = {
        k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in resnet18().state_dict().items()
    }
    content = RecordDict(
        {
            "config": ConfigRecord({"site": "site1"}),
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": 42}),
            "empty": ArrayRecord(),
        }
    )
    return Message(content, dst_node_id=3, message_type="train")


def same_content(a: RecordDict, b: RecordDict) -> bool:
    def arrays(c: RecordDict):
        return {
            n: [(k, x.dtype, tuple(x.shape), x.stype, x.data) for k, x in r.items()]
            for n, r in c.array_records.items()
        }

    return (
        list(a.keys()) == list(b.keys())
        and arrays(a) == arrays(b)
        and dict(a.metric_records) == dict(b.metric_records)
    )


def test_a_trained_model_arrives_exactly_in_a_tenth_of_the_objects():
    message = trained_resnet_message()
    content = message.content
    as_sent = len(get_all_nested_objects(message))
    packed_message = packed(Message(content, dst_node_id=3, message_type="train"))
    assert as_sent >= 200 and len(get_all_nested_objects(packed_message)) <= as_sent / 10
    assert set(packed_message.content.keys()) == {"config", "metrics", PACKED, PACKING}
    restored = unpack(packed_message.content)  # through Flower's serialisation: the site test below
    assert same_content(restored, content)
    state = restored["arrays"].to_torch_state_dict()
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    assert all(torch.equal(state[k], v) for k, v in content["arrays"].to_torch_state_dict().items())


def test_content_without_arrays_is_sent_as_it_is():
    content = RecordDict({"config": ConfigRecord({"query.finished": True})})
    assert pack(content) is content and unpack(content) is content


def _tampered(change) -> RecordDict:
    content = pack(
        RecordDict({"arrays": ArrayRecord({"w": torch.arange(6.0), "b": torch.ones(2)}), "c": ConfigRecord()})
    )
    layout = json.loads(str(content[PACKING][PACKING]))
    data = content[PACKED][PACKED].data
    layout, data = change(layout, data)
    content[PACKING] = ConfigRecord({PACKING: json.dumps(layout) if not isinstance(layout, str) else layout})
    content[PACKED] = ArrayRecord(
        array_dict={PACKED: Array(dtype="uint8", shape=(len(data),), stype="fedrad.packed", data=data)}
    )
    return content


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda lay, d: (lay, d + b"hidden"), "belong to no array"),
        (lambda lay, d: (lay, d[:-8]), "runs past the end"),
        (lambda lay, d: ({**lay, "arrays": {"arrays": lay["arrays"]["arrays"] * 2}}, d + d), "packed twice"),
        (lambda lay, d: ({**lay, "arrays": {**lay["arrays"], "c": []}}, d), "each of its records once"),
        (lambda lay, d: ({**lay, "order": ["arrays", "arrays", "c"]}, d), "each of its records once"),
        (lambda lay, d: ({**lay, "order": [1, "c"]}, d), "not fedrad's"),
        (
            lambda lay, d: ({**lay, "arrays": {"arrays": [["w", "float32", [-6], "numpy.ndarray", 10]]}}, d),
            "valid shape",
        ),
        (
            lambda lay, d: ({**lay, "arrays": {"arrays": [["w", "float32", [6], "numpy.ndarray"]]}}, d),
            r"is not \[key",
        ),
        (
            lambda lay, d: ({**lay, "arrays": {"arrays": [["w", 5, [6], "numpy.ndarray", 10]]}}, d),
            "must be text",
        ),
        (lambda lay, d: ("not json", d), "without its packed array or layout"),
    ],
)
def test_a_layout_that_does_not_account_for_its_bytes_is_refused(change, reason):
    with pytest.raises(PackingError, match=reason):
        unpack(_tampered(change))


class Recorder(DelegatingGrid):
    """The grid under the coordinator's: it keeps what is sent and answers with ``replies``."""

    def __init__(self, replies: list[Message] | None = None) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.sent: list[Message] = []
        self.replies = replies or []

    def push_messages(self, messages):
        self.sent = list(messages)
        return ["id"]

    def pull_messages(self, message_ids):
        return self.replies


def test_the_coordinator_packs_what_it_sends_and_unpacks_replies():
    inner = Recorder([packed(trained_resnet_message())])
    grid = PromptGrid(inner)
    model = trained_resnet_message().content
    grid.push_messages(
        [Message(RecordDict(dict(model.items())), dst_node_id=n, message_type="train") for n in (3, 4)]
    )
    assert set(inner.sent[0].content.keys()) == {"config", "metrics", PACKED, PACKING}
    # the same global model to two sites is packed once
    assert inner.sent[0].content[PACKED] is inner.sent[1].content[PACKED]
    (reply,) = grid.pull_messages(["id"])
    assert same_content(reply.content, trained_resnet_message().content)


def test_a_site_takes_a_packed_message_unpacked():
    sent = trained_resnet_message()
    message, _ = pull_message(
        SlowSuperNode(packed(Message(sent.content, dst_node_id=3, message_type="train")))
    )
    assert same_content(unpacked(message, HeldArrays()).content, trained_resnet_message().content)


def _reply(node: int, content: RecordDict) -> Message:
    reply = Message(content, dst_node_id=0, message_type="evaluate")
    reply.metadata.__dict__["_src_node_id"] = node  # as the SuperLink sets it on arrival
    return reply


def test_a_model_the_site_holds_is_sent_as_a_reference_and_restored_exactly():
    model = trained_resnet_message().content
    inner = Recorder()
    grid = PromptGrid(inner)

    def send_model() -> list[Message]:
        grid.push_messages(
            [Message(RecordDict(dict(model.items())), dst_node_id=n, message_type="train") for n in (3, 4)]
        )
        return inner.sent

    to_site3, _ = send_model()  # to evaluate: the bytes, to both sites
    site3 = HeldArrays()
    assert same_content(unpacked(to_site3, site3).content, model)
    assert site3.latest == digest(b"".join(a.data for r in model.array_records.values() for a in r.values()))
    # site 3 says it holds them; site 4's reply (an error, or one saying nothing) does not
    inner.replies = [
        _reply(3, holding(packed(_reply(3, RecordDict({"m": MetricRecord({"n": 1})}))), site3).content),
        _reply(4, RecordDict({"m": MetricRecord({"n": 1})})),
    ]
    replies = grid.pull_messages(["id"])
    assert all(HOLDS not in reply.content for reply in replies)  # the strategy never sees it
    assert grid.held == {3: site3.latest}

    to_site3, to_site4 = send_model()  # to train from it: a reference to site 3, the bytes to site 4
    assert PACKED not in to_site3.content and PACKED in to_site4.content
    assert len(get_all_nested_objects(to_site3)) <= 5
    assert same_content(unpacked(to_site3, site3).content, model)
    with pytest.raises(PackingError, match="does not hold"):  # a site restarted since
        unpacked(send_model()[0], HeldArrays())


@pytest.mark.parametrize("said", ["../../etc/passwd", "ab" * 40, 7])
def test_a_reply_holding_anything_but_a_digest_holds_nothing(said):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 11, 0
    reply = _reply(3, RecordDict({HOLDS: ConfigRecord({HOLDS: said}), "m": MetricRecord({"n": 1})}))
    assert held_by(reply) is None and HOLDS not in reply.content


def test_a_reference_beside_packed_bytes_is_refused():
    held = HeldArrays()
    content = pack(RecordDict({"arrays": ArrayRecord({"w": torch.arange(6.0)})}))
    unpack(content, held)
    layout = json.loads(str(content[PACKING][PACKING]))
    content[PACKING] = ConfigRecord({PACKING: json.dumps({**layout, "held": held.latest})})
    with pytest.raises(PackingError, match="not fedrad's"):
        unpack(content, held)


class AnsweringSuperNode(SlowSuperNode):
    """A SuperNode's Runtime API that also takes the site's reply."""

    def __init__(self, message: Message) -> None:
        super().__init__(message)
        self.replies: list = []

    def PushMessages(self, request):
        self.replies += list(request.messages_list)
        return PushAppMessagesResponse(session_id="s")

    def PushObject(self, _request):
        return PushObjectResponse(stored=True)

    def PushTaskOutput(self, request):
        self.status = request.sub_status

    def SendTaskHeartbeat(self, _request):
        return type("Answer", (), {"success": True})()

    def close(self):
        pass


def test_a_reference_the_site_cannot_resolve_gets_an_error_reply(monkeypatch):
    """Not silence: the coordinator would wait for the reply until its round timed out."""
    content = pack(RecordDict({"arrays": ArrayRecord({"w": torch.arange(6.0)})}))
    layout = json.loads(str(content[PACKING][PACKING]))
    del content[PACKED]
    content[PACKING] = ConfigRecord({PACKING: json.dumps({**layout, "held": "0" * 64})})
    supernode = AnsweringSuperNode(Message(content, dst_node_id=3, message_type="train"))
    monkeypatch.setattr(warm_runtime.RuntimeHttpClient, "from_server_address", lambda **_: supernode)
    handled: list[Message] = []
    warm_runtime.run_task(
        "127.0.0.1:1", "token", lambda message, context: handled.append(message), HeldArrays()
    )
    (reply,) = supernode.replies
    assert not handled and reply.metadata.reply_to_message_id and reply.HasField("error")
    assert "does not hold" in reply.error.reason
