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

A round sends the same global model twice to each site: to evaluate it, then to train from it
in the next round. A site keeps the packed arrays it received last (:class:`HeldArrays`) and
says in each reply which it holds (their SHA-256, :func:`holding`); the coordinator then sends
a message whose packed arrays are exactly those as a reference to them (``held`` in the
layout) instead of the bytes. The site resolves a reference only to bytes it received itself
and whose digest it computed; one it cannot resolve (a site restarted since) is refused like
any bad packing, and the coordinator sends the bytes again once a reply no longer says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from pipeline.contracts.messages import HOLDS, PACKED, PACKING

PACKED_STYPE = "fedrad.packed"  # the packed array's serialisation: the arrays' bytes end to end
HELD = "held"  # in a layout: the packed bytes are those the receiver holds with this SHA-256
CONFIGS = "configs"  # in a layout: config records' byte values packed after the arrays
BLOB_MIN = 64 * 1024  # smaller byte values (keys, shares) stay where they are
DIGEST = re.compile(r"[0-9a-f]{64}")


class PackingError(ValueError):
    """A packed message whose layout does not describe its bytes."""


def digest(data: bytes) -> str:
    """The SHA-256 of packed bytes, as a site names what it holds."""
    return hashlib.sha256(data).hexdigest()


NOT_HELD = "refers to packed arrays this site does not hold"  # in the refusal of such a reference


class HeldArrays:
    """A site's packed arrays, per run: those of the last message of each run that the site
    handled (for the :data:`KEEP` runs seen last), by SHA-256.

    A message's bytes are held only once the site has handled it (:meth:`accept`: its policy let
    it through), and a reference resolves only within its own run: one run cannot make a site
    train from a model another run sent it, nor learn that model's digest."""

    KEEP = 2  # runs: the federation's current one, and one more the site may serve meanwhile

    def __init__(self) -> None:
        self._held: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self.pending: tuple[int, str | None, bytes] | None = None  # the message being handled
        self.referred = 0  # how many messages referred to arrays held here

    def resolve(self, run_id: int, held: str) -> bytes:
        kept = self._held.get(run_id)
        if kept is None or kept[0] != held:
            raise PackingError(f"the message {NOT_HELD} ({held:.12})")
        self.referred += 1
        return kept[1]

    def accept(self) -> None:
        """The message unpacked last was handled: its packed arrays are held for its run."""
        if self.pending is None:
            return
        run_id, known, data = self.pending
        self.pending = None
        self._held[run_id] = (known or digest(data), data)
        self._held.move_to_end(run_id)
        while len(self._held) > self.KEEP:
            self._held.popitem(last=False)

    def latest(self, run_id: int) -> str | None:
        """The digest of the packed arrays held for ``run_id`` (None when none)."""
        kept = self._held.get(run_id)
        return None if kept is None else kept[0]


@dataclass
class _Packed:
    """One batch's packing of the same array records: the record, its layout, its digest."""

    record: ArrayRecord
    layout: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)

    @cached_property
    def digest(self) -> str:
        return digest(self.record[PACKED].data)


Reuse = dict[tuple, _Packed]  # one batch's packings, by the array records packed


def _blob(value: Any) -> bool:
    """A config value worth packing: bytes, or a list of bytes, of :data:`BLOB_MIN` or more
    (SecAgg+'s masked vector: one int64 array per tensor)."""
    parts = [value] if isinstance(value, bytes) else value if isinstance(value, list) else []
    return bool(parts) and all(isinstance(p, bytes) for p in parts) and sum(map(len, parts)) >= BLOB_MIN


def _blobs(content: RecordDict) -> dict[str, dict[str, Any]]:
    """By config record: its values that travel in the packed bytes."""
    found = {
        name: {key: value for key, value in record.items() if _blob(value)}
        for name, record in content.items()
        if isinstance(record, ConfigRecord)
    }
    return {name: values for name, values in found.items() if values}


def _without(record: ConfigRecord, keys: Iterable[str]) -> ConfigRecord:
    return ConfigRecord({key: value for key, value in record.items() if key not in keys})


def pack(content: RecordDict, reuse: Reuse | None = None, held: str | None = None) -> RecordDict:
    """``content`` with all its array records, and its config records' large byte values,
    packed into one byte array (unchanged when it has neither).

    ``reuse`` (kept by the caller for one batch of messages) packs the same records once:
    a coordinator sends the same global model to every site, and each packed copy would be
    joined and hashed again. ``held`` is the digest of the packed arrays the receiver holds:
    when they are these, the message refers to them instead of carrying them."""
    arrays = {name: record for name, record in content.items() if isinstance(record, ArrayRecord)}
    blobs = _blobs(content)
    if not arrays and not blobs:
        return content
    key = tuple((name, id(record)) for name, record in arrays.items()) + tuple(
        (name, id(content[name])) for name in blobs
    )
    if reuse is not None and key in reuse:
        packing = reuse[key]
    else:
        parts = [a.data for record in arrays.values() for a in record.values()]
        parts += [
            b
            for values in blobs.values()
            for v in values.values()
            for b in ([v] if isinstance(v, bytes) else v)
        ]
        data = b"".join(parts)
        packing = _Packed(
            ArrayRecord(
                array_dict={PACKED: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
            ),
            {
                name: [[k, a.dtype, list(a.shape), a.stype, len(a.data)] for k, a in record.items()]
                for name, record in arrays.items()
            },
            {
                name: [
                    [k, "bytes", [len(v)]] if isinstance(v, bytes) else [k, "list", [len(b) for b in v]]
                    for k, v in values.items()
                ]
                for name, values in blobs.items()
            },
        )
        if reuse is not None:
            reuse[key] = packing
    layout: dict[str, Any] = {"order": list(content.keys()), "arrays": packing.layout}
    if packing.configs:
        layout[CONFIGS] = packing.configs
    packed = RecordDict(
        {
            name: _without(content.config_records[name], blobs[name]) if name in blobs else record
            for name, record in content.items()
            if name not in arrays
        }
    )
    if held is not None and held == packing.digest:
        layout[HELD] = held
    else:
        packed[PACKED] = packing.record
    packed[PACKING] = ConfigRecord({PACKING: json.dumps(layout)})
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


def _config_entry(entry: Any) -> tuple[str, str, list[int]]:
    """One packed config value's layout entry, checked: key, kind, byte counts."""
    if not (isinstance(entry, list) and len(entry) == 3):
        raise PackingError(f"a config value's layout is not [key, kind, sizes]: {entry!r:.80}")
    key, kind, sizes = entry
    if not (isinstance(key, str) and kind in ("bytes", "list")):
        raise PackingError(f"a config value's key must be text and its kind bytes or list: {entry!r:.80}")
    if not (isinstance(sizes, list) and all(isinstance(n, int) and n >= 0 for n in sizes)):
        raise PackingError(f"config value {key!r:.40} has no valid byte counts")
    if kind == "bytes" and len(sizes) != 1:
        raise PackingError(f"config value {key!r:.40} is bytes but has {len(sizes)} byte counts")
    return key, kind, sizes


def _packed_bytes(content: RecordDict, layout: dict, held: HeldArrays | None, run_id: int) -> bytes:
    """The packed bytes ``content`` carries, or those it refers to that the receiver holds."""
    if HELD in layout:
        if PACKED in content or held is None or not isinstance(layout[HELD], str):
            raise PackingError("a packed message that refers to held arrays is not fedrad's")
        return held.resolve(run_id, layout[HELD])
    try:
        packed = content.array_records[PACKED][PACKED]
    except KeyError as exc:
        raise PackingError(f"a packed message without its packed array or layout ({exc})") from exc
    if packed.stype != PACKED_STYPE:
        raise PackingError("a packed message whose packed array or layout is not fedrad's")
    return packed.data


def unpack(content: RecordDict, held: HeldArrays | None = None, run_id: int = 0) -> RecordDict:
    """``content`` as it was before :func:`pack` (unchanged when it is not packed); ``held``,
    a site's, resolves a reference to packed arrays it holds for ``run_id`` and notes those it
    receives (held once the site accepts the message)."""
    if PACKED not in content and PACKING not in content:
        return content
    try:
        layout = json.loads(str(content.config_records[PACKING][PACKING]))
        order, named = layout["order"], layout["arrays"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackingError(f"a packed message without its packed array or layout ({exc})") from exc
    names_ok = isinstance(order, list) and all(isinstance(name, str) for name in order)
    if not (isinstance(named, dict) and names_ok):
        raise PackingError("a packed message whose packed array or layout is not fedrad's")
    data = _packed_bytes(content, layout, held, run_id)
    others = {name: record for name, record in content.items() if name not in (PACKED, PACKING)}
    if set(named) & set(others) or sorted(order) != sorted(set(named) | set(others)):
        raise PackingError("a packed message's layout does not name each of its records once")
    offset = 0
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
    configs = layout.get(CONFIGS, {})
    if not isinstance(configs, dict):
        raise PackingError("a packed message whose config layout is not fedrad's")
    for name, entries in configs.items():
        record = others.get(name)
        if not (isinstance(record, ConfigRecord) and isinstance(entries, list)):
            raise PackingError(
                f"packed config values for {name!r:.40}, which is no config record of the message"
            )
        values: dict[str, bytes | list[bytes]] = {}
        for key, kind, sizes in map(_config_entry, entries):
            if key in values or key in record:
                raise PackingError(f"config value {key!r:.40} of {name!r:.40} is packed twice")
            if offset + sum(sizes) > len(data):
                raise PackingError(f"config value {key!r:.40} runs past the end of the packed bytes")
            parts = []
            for size in sizes:
                parts.append(data[offset : offset + size])
                offset += size
            values[key] = parts[0] if kind == "bytes" else parts
        others[name] = ConfigRecord({**dict(record.items()), **values})
    if offset != len(data):
        raise PackingError(f"{len(data) - offset} packed bytes belong to no array")
    if held is not None:
        held.pending = (run_id, layout.get(HELD), data)
    return RecordDict({name: records[name] if name in records else others[name] for name in order})


def packed(message: Message, reuse: Reuse | None = None, held: str | None = None) -> Message:
    """``message`` with its content packed (in place; an error message is left as it is);
    ``held``: the digest of the packed arrays its receiver holds (:func:`pack`)."""
    if message.has_content():
        message.content = pack(message.content, reuse, held)
    return message


def refers(message: Message) -> bool:
    """Whether a packed ``message`` refers to packed arrays its receiver holds."""
    return message.has_content() and PACKING in message.content and PACKED not in message.content


def unpacked(message: Message, held: HeldArrays | None = None) -> Message:
    """``message`` with its content unpacked (in place; raises :class:`PackingError`)."""
    if held is not None:
        held.pending = None
    if message.has_content():
        message.content = unpack(message.content, held, message.metadata.run_id)
    return message


def holding(reply: Message, held: HeldArrays) -> Message:
    """A site's ``reply`` saying which packed arrays the site holds for the reply's run (in place)."""
    latest = held.latest(reply.metadata.run_id)
    if reply.has_content() and latest is not None:
        reply.content[HOLDS] = ConfigRecord({HOLDS: latest})
    return reply


def held_by(reply: Message) -> str | None:
    """The digest of the packed arrays a site's ``reply`` says the site holds, taken out of it
    (None when it says nothing, or nothing that is a SHA-256)."""
    if not reply.has_content() or HOLDS not in reply.content:
        return None
    record = reply.content.pop(HOLDS)
    value = record.get(HOLDS) if isinstance(record, ConfigRecord) else None
    return value if isinstance(value, str) and DIGEST.fullmatch(value) else None
