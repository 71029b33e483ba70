"""A site's tamper-evident ledger: append-only, hash-chained, signed JSON lines on its own disk.

``<work dir>/ledger.jsonl`` holds one entry per line::

    {"seq": 1, "time": "...Z", "kind": "round", "body": {...}, "prev": "<hash of entry 0>",
     "hash": "<sha256 of the canonical JSON of seq, time, kind, body, prev>",
     "signature": "<Ed25519 signature of the hash, hex>"}

Sequence numbers start at 1; entry 1's ``prev`` is :data:`GENESIS`. Editing, reordering or
removing an entry breaks a hash, a ``prev`` link or a signature; removing entries from the end,
or rewriting the tail with the site's own key, is caught against the heads the site reported to
the coordinator (:func:`pipeline.governance.heads.coordinator_heads`). Bodies hold pseudonymous
keys and hashes only, never a patient or file identifier.

An entry holds exactly the fields above, in the canonical JSON the site writes (sorted keys, no
spaces, ASCII, no NaN or Infinity): a field added after signing is covered by no hash or
signature, so :meth:`SiteLedger.verify` reports it, and anything that decides from the ledger
(job approval, the privacy budget) reads :meth:`SiteLedger.verified_entries`, never the
unchecked :meth:`SiteLedger.entries`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.contracts.layout import WorkDir
from pipeline.governance.keys import site_public_key, site_signing_key

GENESIS = "0" * 64
SIGNED_FIELDS = ("seq", "time", "kind", "body", "prev")
ENTRY_FIELDS = {*SIGNED_FIELDS, "hash", "signature"}
FIELD_TYPES = {"seq": int, "time": str, "kind": str, "body": dict, "prev": str, "hash": str, "signature": str}
Head = tuple[int, str]


class LedgerCorrupted(RuntimeError):
    """The ledger is not intact: a line is not a whole entry (torn write or tampering), or
    :meth:`SiteLedger.verified_entries` found a problem. The message is one line naming the file."""


def canonical_json(value: object) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, ASCII only; NaN and Infinity (not JSON)
    raise ``ValueError``."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def round_trips(value: object) -> bool:
    """Whether ``value`` is plain JSON that canonical JSON gives back unchanged (no NaN or
    Infinity, no tuple, no non-string key, no other Python object)."""
    try:
        return json.loads(canonical_json(value)) == value and _plain(value)
    except (TypeError, ValueError):
        return False


def _plain(value: object) -> bool:
    """Only dict (string keys), list, str, int, float, bool and None, all the way down."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _as_json(kind: str, body: dict) -> dict:
    """``body`` as the ledger stores it (tuples become lists); refuses NaN, Infinity and
    anything else that JSON cannot hold, before anything is written."""
    if not isinstance(body, dict):
        raise TypeError(f"a {kind} entry's body must be a dict, not {type(body).__name__}")
    try:
        return json.loads(canonical_json(body))
    except (TypeError, ValueError) as error:
        raise ValueError(f"a {kind} entry's body must be plain JSON (no NaN or Infinity): {error}") from None


def _typed(entry: dict) -> bool:
    """Every entry field is present with its type (a bool is no sequence number)."""
    return ENTRY_FIELDS <= entry.keys() and all(
        isinstance(entry[k], t) and not isinstance(entry[k], bool) for k, t in FIELD_TYPES.items()
    )


def _printable(text: str) -> str:
    return text if text.isprintable() and len(text) <= 40 else repr(text[:40])


def entry_hash(entry: dict) -> str:
    """sha256 (hex) of the canonical JSON of the entry's signed fields."""
    return hashlib.sha256(canonical_json({k: entry[k] for k in SIGNED_FIELDS})).hexdigest()


def _raw(public_key: Ed25519PublicKey) -> bytes:
    """The key's 32 raw bytes."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@functools.lru_cache(maxsize=1 << 16)
def _signed(public_key: bytes, signature: str, digest: str) -> bool:
    """Whether ``signature`` (hex) is ``public_key``'s Ed25519 signature of ``digest`` (hex).

    Remembered: the answer for the same three values never changes, so a long-lived site
    process verifies each entry of its growing ledger once, not at every message of every round.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(signature), bytes.fromhex(digest))
    except (InvalidSignature, ValueError):
        return False
    return True


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a ledger public key: names the ledger in the coordinator's heads."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def _short(value: object) -> str:
    """A body value for a listing: hashes cut to 12 characters, long lists counted."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items]"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def describe(entry: dict) -> str:
    """One readable line per entry (the accountant history is left out)."""
    body = ", ".join(f"{k}={_short(v)}" for k, v in entry["body"].items() if k != "history")
    return f"{entry['seq']:>5}  {entry['time']}  {entry['kind']:<11} {body}"


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class SiteLedger:
    """One site's ledger file (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        self.path = Path(path)
        self.signing_key = signing_key
        if public_key is None and signing_key is not None:
            public_key = signing_key.public_key()
        self.public_key = public_key

    @classmethod
    def for_site(cls, work_dir: Path) -> "SiteLedger":
        """The ledger of the site whose fedrad work dir is ``work_dir``, with its signing key."""
        return cls(WorkDir(Path(work_dir)).ledger, signing_key=site_signing_key(Path(work_dir)))

    @classmethod
    def for_reading(cls, work_dir: Path, public_key: Ed25519PublicKey | None = None) -> "SiteLedger":
        """A site's ledger opened to verify or list only (no signing key needed)."""
        work_dir = Path(work_dir)
        return cls(WorkDir(work_dir).ledger, public_key=public_key or site_public_key(work_dir))

    @property
    def key_id(self) -> str:
        if self.public_key is None:
            raise ValueError(f"no public key given for the ledger {self.path}")
        return key_id(self.public_key)

    def append(self, kind: str, body: dict) -> dict:
        """Sign and append one entry under an exclusive file lock; returns the entry."""
        if self.signing_key is None:
            raise PermissionError(f"{self.path} was opened without the site's signing key")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                seq, prev = self._head_of(handle.read())
                entry = {
                    "seq": seq + 1,
                    "time": _utc_now(),
                    "kind": str(kind),
                    "body": _as_json(kind, body),
                    "prev": prev,
                }
                digest = entry_hash(entry)
                entry["hash"] = digest
                entry["signature"] = self.signing_key.sign(bytes.fromhex(digest)).hex()
                handle.write(canonical_json(entry) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return entry

    def _head_of(self, data: bytes) -> Head:
        """(seq, hash) of the last entry in the file's bytes; refuses a torn last line."""
        if not data.strip():
            return 0, GENESIS
        try:
            if not data.endswith(b"\n"):
                raise ValueError("incomplete last line")
            last = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError) as error:
            raise LedgerCorrupted(
                f"{self.path}: the last line is not a whole entry ({error}); nothing more is "
                "appended until it is inspected (python scripts/ledger.py action=verify)"
            ) from error

    def _read(self) -> bytes:
        """The file's bytes, read under a shared lock (never half of an append); empty if none."""
        try:
            with open(self.path, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_SH)
                try:
                    return handle.read()
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except FileNotFoundError:
            return b""

    @staticmethod
    def _lines(data: bytes) -> list[bytes]:
        lines = data.split(b"\n")
        return lines[:-1] if lines and lines[-1] == b"" else lines

    def entries(self) -> list[dict]:
        """Every entry, in file order, UNCHECKED: for listing only. Whatever decides from the
        ledger (approvals, the privacy budget) uses :meth:`verified_entries`."""
        entries = []
        for line_no, line in enumerate(self._lines(self._read()), start=1):
            try:
                entries.append(json.loads(line))
            except ValueError as error:
                raise LedgerCorrupted(
                    f"{self.path} line {line_no} is not a ledger entry ({error}): "
                    "check it with scripts/ledger.py action=verify"
                ) from error
        return entries

    def head(self) -> Head:
        """(seq, hash) of the last entry; ``(0, GENESIS)`` for an empty ledger."""
        if not self.path.is_file():
            return 0, GENESIS
        return self._head_of(self.path.read_bytes())

    def verify(self, expected_heads: Iterable[Head] | None = None) -> list[str]:
        """Problems found in the ledger (empty when intact), each naming the entry.

        Checks that every line is one entry with exactly the entry fields (a field added after
        signing is named), in canonical JSON with a body that round-trips, and its hash,
        signature, sequence number and link to the entry before it; with ``expected_heads``
        (heads the site reported to the coordinator), also that each reported head is still in
        the ledger, which catches a truncated or rewritten tail.
        """
        return self._check(self._read(), expected_heads)[1]

    def verified_entries(
        self, expected_heads: Iterable[Head] | None = None, kind: str | None = None
    ) -> list[dict]:
        """Every entry (or every entry of ``kind``), in order, once the whole ledger verifies.

        The one way to read the ledger for a decision: the file is read once, under a shared
        lock, and checked as :meth:`verify` does (with ``expected_heads`` when given), against
        this ledger's public key; for a site's own ledger open it with :meth:`for_site`, whose
        public key comes from the site's private key, not from the published ``.pub`` file.
        Each entry returned holds exactly the signed fields plus ``hash`` and ``signature``.
        Raises :class:`LedgerCorrupted`, one line naming the file and the first problem, if any
        problem is found; an absent ledger has no entries.
        """
        entries, problems = self._check(self._read(), expected_heads)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LedgerCorrupted(
                f"{self.path} does not verify: {problems[0]}{more}; nothing is decided from it "
                "until it is inspected (python scripts/ledger.py +site=<this site> action=verify)"
            )
        return [e for e in entries if kind is None or e["kind"] == kind]

    def _check(self, data: bytes, expected_heads: Iterable[Head] | None) -> tuple[list[dict], list[str]]:
        """(well-formed entries, problems) of the ledger file's bytes ``data``."""
        if self.public_key is None:
            raise ValueError(f"verifying {self.path} needs the site's public key")
        problems: list[str] = []
        entries: list[dict] = []
        by_seq: dict[int, str] = {}
        public = _raw(self.public_key)
        prev, seq = GENESIS, 0
        for line_no, line in enumerate(self._lines(data), start=1):
            seq += 1
            where = f"line {line_no} (expected entry {seq})"
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or not _typed(entry):
                problems.append(f"{where}: not a ledger entry")
                continue
            where = f"entry {entry['seq']} ({_printable(entry['kind'])}, line {line_no})"
            for field in sorted(entry.keys() - ENTRY_FIELDS):
                problems.append(
                    f"{where}: unsigned field {field[:40]!r} that neither its hash "
                    "nor its signature covers (added after signing)"
                )
            if not round_trips(entry["body"]):
                problems.append(
                    f"{where}: its body is not plain JSON that round-trips (NaN, "
                    "Infinity or an out-of-range number)"
                )
            else:
                try:
                    canonical = canonical_json(entry) == line
                except ValueError:
                    canonical = False
                if not canonical:
                    problems.append(
                        f"{where}: not in the canonical JSON the site writes "
                        "(re-serialised, a duplicate key, or edited)"
                    )
            if entry["seq"] != seq:
                problems.append(
                    f"{where}: sequence number {entry['seq']} where {seq} was expected "
                    "(an entry was removed, inserted or moved)"
                )
            if entry["prev"] != prev:
                problems.append(
                    f"{where}: does not link to the entry before it (an entry was removed, inserted or moved)"
                )
            try:
                hashed = entry_hash(entry) == entry["hash"]
            except ValueError:  # NaN or Infinity: no canonical JSON, so no hash
                hashed = False
            if not hashed:
                problems.append(f"{where}: its hash does not match its contents (edited)")
            if not _signed(public, str(entry["signature"]), str(entry["hash"])):
                problems.append(f"{where}: signature is not the site key's ({self.key_id})")
            by_seq.setdefault(entry["seq"], entry["hash"])
            entries.append({k: entry[k] for k in (*SIGNED_FIELDS, "hash", "signature")})
            prev, seq = entry["hash"], entry["seq"]
        for head_seq, head_hash in sorted(set(expected_heads or ())):
            if head_seq == 0:
                continue
            if head_seq not in by_seq:
                problems.append(
                    f"entry {head_seq} was reported to the coordinator (head "
                    f"{head_hash[:12]}...) but is missing: the ledger ends at entry "
                    f"{max(by_seq, default=0)} (its tail was removed)"
                )
            elif by_seq[head_seq] != head_hash:
                problems.append(
                    f"entry {head_seq} differs from the head reported to the "
                    f"coordinator ({head_hash[:12]}...): history was rewritten"
                )
        return entries, problems
