"""A deployed message's arrays travel packed into one byte array (pipeline.contracts.packing):
exactly what was sent arrives, in a tenth of the objects, and a layout that does not
account for its bytes is refused."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from models.resnet import resnet18
from pipeline.contracts.messages import PACKED, PACKING
from pipeline.contracts.packing import PackingError, pack, packed, unpack
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


def test_the_coordinator_packs_what_it_sends_and_unpacks_replies():
    class Recorder(DelegatingGrid):
        def push_messages(self, messages):
            self.sent = list(messages)
            return ["id"]

        def pull_messages(self, message_ids):
            return [packed(trained_resnet_message())]

    inner = Recorder(None)  # type: ignore[arg-type]
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
    assert same_content(message.content, trained_resnet_message().content)
