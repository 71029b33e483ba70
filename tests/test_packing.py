"""A deployed message's arrays travel packed into one byte array (pipeline.contracts.packing):
exactly what was sent arrives, in a tenth of the objects, and a layout that does not
account for its bytes is refused; a model the site holds already is sent as a reference."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import PushObjectResponse
from flwr.proto.runtime_pb2 import PushAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from models.resnet import resnet18
from pipeline.contracts.messages import HOLDS, PACKED, PACKING
from pipeline.contracts.packing import (
    NOT_HELD,
    HeldArrays,
    PackingError,
    digest,
    held_by,
    holding,
    pack,
    packed,
    refers,
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
        return [f"id{i}" for i in range(len(self.sent))]

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


class Sites(DelegatingGrid):
    """A SuperLink and its sites in one process: each site answers as the warm runtime does
    (unpack with its held arrays, a refused packing answered with an error, a handled message's
    arrays held, the reply saying so)."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.held = {node: HeldArrays() for node in nodes}
        self.received: dict[int, RecordDict] = {}
        self.referred: list[bool] = []  # for each message sent: whether it was a reference
        self.queue: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            ids.append(f"m{len(self.referred)}")
            message.metadata.__dict__["_message_id"] = ids[-1]
            self.referred.append(refers(message))
            self.queue.append(self.answer(message))
        return ids

    def answer(self, message: Message) -> Message:
        held = self.held[message.metadata.dst_node_id]
        try:
            self.received[message.metadata.dst_node_id] = unpacked(message, held).content
        except PackingError as exc:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"PackingError: {exc}")
            return Message(error, reply_to=message)
        held.accept()
        return holding(packed(Message(RecordDict({"m": MetricRecord({"n": 1})}), reply_to=message)), held)

    def pull_messages(self, message_ids):
        ready = [reply for reply in self.queue if reply.metadata.reply_to_message_id in set(message_ids)]
        self.queue = [reply for reply in self.queue if reply not in ready]
        return ready


def _stage(grid: PromptGrid, content: RecordDict, nodes=(3, 4)) -> list[Message]:
    """One stage: ``content`` (a copy) to every node, the replies collected."""
    messages = [
        Message(RecordDict(dict(content.items())), dst_node_id=n, message_type="train") for n in nodes
    ]
    return list(grid.send_and_receive(messages, timeout=10))


def test_a_model_the_site_holds_is_sent_as_a_reference_and_restored_exactly():
    model = trained_resnet_message().content
    sites = Sites([3, 4])
    grid = PromptGrid(sites)
    replies = _stage(grid, model)  # to evaluate: the bytes
    assert sites.referred == [False, False] and all(HOLDS not in r.content for r in replies)
    model_digest = digest(b"".join(a.data for r in model.array_records.values() for a in r.values()))
    assert grid.held == {3: model_digest, 4: model_digest}
    _stage(grid, model)  # to train from it: a reference, the same content restored at each site
    assert sites.referred[2:] == [True, True]
    assert all(same_content(sites.received[node], model) for node in (3, 4))
    reference = packed(
        Message(RecordDict(dict(model.items())), dst_node_id=3, message_type="train"), None, model_digest
    )
    assert len(get_all_nested_objects(reference)) <= 5


def test_a_site_that_no_longer_holds_the_model_is_sent_it_again(caplog):
    model = trained_resnet_message().content
    sites = Sites([3, 4])
    grid = PromptGrid(sites)
    _stage(grid, model)
    sites.held[3] = HeldArrays()  # site 3 restarted since it answered
    with caplog.at_level(logging.WARNING, logger="fedrad.federation"):
        replies = _stage(grid, model)
    assert sites.referred[2:] == [True, True, False]  # the reference, then the bytes again to site 3
    assert len(replies) == 2 and not any(reply.has_error() for reply in replies)
    assert same_content(sites.received[3], model)
    assert "no longer held the model referred to: sent again" in caplog.text


def test_a_reference_resolves_only_within_its_run_and_to_arrays_the_site_handled():
    content = RecordDict({"arrays": ArrayRecord({"w": torch.arange(6.0)})})
    TaskIdentity.run_id = 7
    held = HeldArrays()
    unpacked(packed(Message(RecordDict(dict(content.items())), dst_node_id=3, message_type="train")), held)
    assert held.latest(7) is None  # not handled (refused by the site's policy): not held
    held.accept()
    held_digest = held.latest(7)
    assert held_digest is not None
    TaskIdentity.run_id = 8  # another run on the same SuperLink
    other_run = packed(
        Message(RecordDict(dict(content.items())), dst_node_id=3, message_type="train"), None, held_digest
    )
    with pytest.raises(PackingError, match=NOT_HELD):
        unpacked(other_run, held)
    reply = holding(
        Message(RecordDict({"m": MetricRecord({"n": 1})}), dst_node_id=0, message_type="train"), held
    )
    assert HOLDS not in reply.content  # run 8 does not learn what run 7 sent
    TaskIdentity.run_id = 7


@pytest.mark.parametrize("said", ["../../etc/passwd", "ab" * 40, 7])
def test_a_reply_holding_anything_but_a_digest_holds_nothing(said):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 11, 0
    reply = _reply(3, RecordDict({HOLDS: ConfigRecord({HOLDS: said}), "m": MetricRecord({"n": 1})}))
    assert held_by(reply) is None and HOLDS not in reply.content


def test_a_reference_beside_packed_bytes_is_refused():
    held = HeldArrays()
    content = pack(RecordDict({"arrays": ArrayRecord({"w": torch.arange(6.0)})}))
    unpack(content, held, run_id=7)
    held.accept()
    layout = json.loads(str(content[PACKING][PACKING]))
    content[PACKING] = ConfigRecord({PACKING: json.dumps({**layout, "held": held.latest(7)})})
    with pytest.raises(PackingError, match="not fedrad's"):
        unpack(content, held, run_id=7)


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


def _masked_reply() -> RecordDict:
    """A SecAgg+ reply as Flower's mod makes it: the masked vector as a list of bytes (one per
    tensor) in a config record, beside small byte values (keys) that stay where they are."""
    rng = torch.Generator().manual_seed(0)
    masked = [torch.randint(0, 2**40, (n,), generator=rng).numpy().tobytes() for n in (30000, 9000, 17)]
    return RecordDict(
        {
            "fitres.metrics": MetricRecord({"num-examples": 42}),
            "secaggplus": ConfigRecord(
                {"masked_params": masked, "public_key": b"k" * 90, "stage": "collect"}
            ),
        }
    )


def test_a_masked_vector_travels_in_the_packed_bytes_and_arrives_exactly():
    content = _masked_reply()
    packed_content = pack(content)
    assert dict(packed_content["secaggplus"]) == {"public_key": b"k" * 90, "stage": "collect"}
    assert len(packed_content[PACKED][PACKED].data) == sum(map(len, content["secaggplus"]["masked_params"]))
    restored = unpack(packed_content)
    assert dict(restored["secaggplus"]) == dict(content["secaggplus"])
    assert list(restored.keys()) == list(content.keys())


@pytest.mark.parametrize(
    "configs, reason",
    [
        ({"secaggplus": [["masked_params", "list", [10**9]]]}, "runs past the end"),
        ({"secaggplus": [["public_key", "bytes", [0]]]}, "packed twice"),
        ({"fitres.metrics": [["x", "bytes", [0]]]}, "no config record"),
        ({"elsewhere": [["x", "bytes", [0]]]}, "no config record"),
        ({"secaggplus": [["x", "pickle", [0]]]}, "kind bytes or list"),
        ({"secaggplus": [["x", "bytes", [0, 0]]]}, "2 byte counts"),
        ({"secaggplus": [["x", "list", [-1]]]}, "no valid byte counts"),
        (["not", "a", "dict"], "config layout"),
    ],
)
def test_a_config_layout_that_does_not_account_for_its_bytes_is_refused(configs, reason):
    content = pack(_masked_reply())
    layout = json.loads(str(content[PACKING][PACKING]))
    content[PACKING] = ConfigRecord({PACKING: json.dumps({**layout, "configs": configs})})
    with pytest.raises(PackingError, match=reason):
        unpack(content)
