"""Ledger heads exchanged each round: what a site reports and what the coordinator keeps.

With its reply to every evaluation message a site sends the head of its ledger (sequence
number, entry hash, and the fingerprint of its ledger key). The coordinator appends them to
``<output dir>/ledger_heads.jsonl``; a site's ledger verified against that file cannot have
lost or rewritten any entry up to the last head it reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipeline.contracts.layout import RunLayout
from pipeline.governance.site_ledger import Head, SiteLedger


def site_head(work_dir: Path) -> dict[str, str | int]:
    """The head a site reports: ``seq``, ``head`` (hash) and ``ledger`` (key fingerprint)."""
    ledger = SiteLedger.for_site(work_dir)
    seq, head = ledger.head()
    return {"seq": seq, "head": head, "ledger": ledger.key_id}


def record_heads(output_dir: Path, server_round: int, heads: dict[str, dict]) -> None:
    """Append the heads the sites reported in a round (keyed by site name) to the heads file."""
    path = RunLayout(Path(output_dir)).ledger_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for site, head in heads.items():
            line = {"round": server_round, "site": site, **head}
            handle.write(json.dumps(line, sort_keys=True) + "\n")


def coordinator_heads(heads_file: Path, ledger_key_id: str) -> list[Head]:
    """The (seq, hash) heads recorded in ``heads_file`` for the ledger with this key."""
    path = Path(heads_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"no coordinator heads file at {path} (it is "
            f"{RunLayout(path.parent).ledger_heads.name} in the federation's output folder)"
        )
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [(int(h["seq"]), str(h["head"])) for h in lines if h.get("ledger") == ledger_key_id]


def verify_site_ledger(
    work_dir: Path, heads_file: Path | None = None, public_key: Ed25519PublicKey | None = None
) -> list[str]:
    """Problems in a site's ledger, checked against the coordinator's heads when given, with
    ``public_key`` or else the key the site published next to its ledger."""
    ledger = SiteLedger.for_reading(work_dir, public_key)
    if heads_file is None:
        return ledger.verify()
    heads = coordinator_heads(heads_file, ledger.key_id)
    problems = ledger.verify(heads)
    if not heads:
        problems.append(
            f"{heads_file} holds no head of the ledger key {ledger.key_id}: the site "
            "never reported this ledger, or its key was replaced"
        )
    return problems
