"""A deployed message's arrays packed into one byte array, so that Flower moves a model as a
few large objects instead of one per tensor.

Flower 1.41 moves a message as a tree of objects, one HTTP request per object and hop
(coordinator to its SuperLink, SuperLink to the site's SuperNode, SuperNode to the site, and
back): a trained ResNet-18 is 212 objects, about 10 s on its way over loopback
(docs/benchmarks.md). The coordinator's grid and each site's warm runtime pack every array
record of a message they send into one byte array (:func:`pack`: 13 objects for that model)
and unpack what they receive (:func:`unpack`); the strategies, SecAgg+ and the ClientApp above
them see Flower's records unchanged. Unpacking trusts nothing in the layout: it accounts for
every byte, names each array once and names no record the message holds otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from pipeline.contracts.messages import PACKED, PACKING

PACKED_STYPE = "fedrad.packed"  # the packed array's serialisation: the arrays' bytes end to end


class PackingError(ValueError):
    """A packed message whose layout does not describe its bytes."""


def pack(content: RecordDict, reuse: dict[tuple, tuple[ArrayRecord, dict]] | None = None) -> RecordDict:
    """``content`` with all its array records packed into one (unchanged when it has none).

    ``reuse`` (kept by the caller for one batch of messages) packs the same array records once:
    a coordinator sends the same global model to every site, and each packed copy would be
    joined and hashed again."""
    arrays = {name: record for name, record in content.items() if isinstance(record, ArrayRecord)}
    if not arrays:
        return content
    key = tuple((name, id(record)) for name, record in arrays.items())
    if reuse is not None and key in reuse:
        packed_arrays, layout_arrays = reuse[key]
    else:
        layout_arrays = {
            name: [[k, a.dtype, list(a.shape), a.stype, len(a.data)] for k, a in record.items()]
            for name, record in arrays.items()
        }
        data = b"".join(a.data for record in arrays.values() for a in record.values())
        packed_arrays = ArrayRecord(
            array_dict={PACKED: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
        )
        if reuse is not None:
            reuse[key] = (packed_arrays, layout_arrays)
    packed = RecordDict({name: record for name, record in content.items() if name not in arrays})
    packed[PACKED] = packed_arrays
    packed[PACKING] = ConfigRecord(
        {PACKING: json.dumps({"order": list(content.keys()), "arrays": layout_arrays})}
    )
    return packed


def _entry(entry: Any) -> tuple[str, str, tuple[int, ...], str, int]:
    """One array's layout entry, checked: key, dtype, shape, stype, byte count."""
    if not (isinstance(entry, list) and len(entry) == 5):
        raise PackingError(f"an array's layout is not [key, dtype, shape, stype, bytes]: {entry!r:.80}")
    key, dtype, shape, stype, size = entry
    if not all(isinstance(v, str) for v in (key, dtype, stype)):
        raise PackingError(f"an array's key, dtype and stype must be text: {entry!r:.80}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise PackingError(f"array {key!r:.40} has no valid shape")
    if not (isinstance(size, int) and size >= 0):
        raise PackingError(f"array {key!r:.40} has no valid byte count")
    return key, dtype, tuple(shape), stype, size


def unpack(content: RecordDict) -> RecordDict:
    """``content`` as it was before :func:`pack` (unchanged when it is not packed)."""
    if PACKED not in content and PACKING not in content:
        return content
    try:
        packed = content.array_records[PACKED][PACKED]
        layout = json.loads(str(content.config_records[PACKING][PACKING]))
        order, named = layout["order"], layout["arrays"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackingError(f"a packed message without its packed array or layout ({exc})") from exc
    if (
        packed.stype != PACKED_STYPE
        or not isinstance(named, dict)
        or not (isinstance(order, list) and all(isinstance(name, str) for name in order))
    ):
        raise PackingError("a packed message whose packed array or layout is not fedrad's")
    others = {name: record for name, record in content.items() if name not in (PACKED, PACKING)}
    if set(named) & set(others) or sorted(order) != sorted(set(named) | set(others)):
        raise PackingError("a packed message's layout does not name each of its records once")
    data, offset = packed.data, 0
    records: dict[str, ArrayRecord] = {}
    for name, entries in named.items():
        if not isinstance(entries, list):
            raise PackingError(f"record {name!r:.40} of a packed message has no list of arrays")
        arrays: dict[str, Array] = {}
        for key, dtype, shape, stype, size in map(_entry, entries):
            if key in arrays:
                raise PackingError(f"array {key!r:.40} is packed twice in record {name!r:.40}")
            if offset + size > len(data):
                raise PackingError(f"array {key!r:.40} runs past the end of the packed bytes")
            arrays[key] = Array(dtype=dtype, shape=shape, stype=stype, data=data[offset : offset + size])
            offset += size
        records[name] = ArrayRecord(array_dict=arrays)
    if offset != len(data):
        raise PackingError(f"{len(data) - offset} packed bytes belong to no array")
    return RecordDict({name: records[name] if name in records else others[name] for name in order})


def packed(message: Message, reuse: dict[tuple, tuple[ArrayRecord, dict]] | None = None) -> Message:
    """``message`` with its content packed (in place; an error message is left as it is)."""
    if message.has_content():
        message.content = pack(message.content, reuse)
    return message


def unpacked(message: Message) -> Message:
    """``message`` with its content unpacked (in place; raises :class:`PackingError`)."""
    if message.has_content():
        message.content = unpack(message.content)
    return message
