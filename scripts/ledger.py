r"""List or verify a site's tamper-evident ledger.

For a site's data owner or auditor. Required: +site=<your site file>; action=verify heads=<coordinator's ledger_heads.jsonl> to check against the coordinator.

    python scripts/ledger.py +site=demo_site1                       # list every entry
    python scripts/ledger.py +site=demo_site1 action=verify         # check hashes, links, signatures
    python scripts/ledger.py +site=demo_site1 action=verify \
        heads=outputs/runs/X/ledger_heads.jsonl                   # and against the coordinator

With ``heads`` (the coordinator's copy of the heads the site reported each round) a truncated or
rewritten tail is caught too; with ``public_key`` (a copy of the site's ledger_signing.pub kept
elsewhere) a ledger re-signed with a replaced key is caught as well. Exits with status 1 and
names each entry when tampering is found; with status 2 and one line (the file and the fix)
when it cannot check at all (a missing, unreadable or garbage key file, a missing heads file).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.deployment.site import configured_site  # noqa: E402
from pipeline.governance.heads import verify_site_ledger  # noqa: E402
from pipeline.governance.keys import load_public_key  # noqa: E402
from pipeline.governance.site_ledger import LedgerCorrupted, SiteLedger, describe  # noqa: E402

ACTIONS = ("show", "verify")
# What the tool reports as one line (file and fix) instead of a traceback; KeyFileError is a ValueError.
def run(cfg: DictConfig) -> int:
    """List and/or verify; the exit status (0 intact, 1 tampered)."""
    if cfg.action not in ACTIONS:
        raise ValueError(f"action={cfg.action}: expected one of {ACTIONS}")
    work_dir = configured_site(cfg).work_dir
    public_key = load_public_key(Path(cfg.public_key)) if cfg.public_key else None
    ledger = SiteLedger.for_reading(work_dir, public_key)
    problems = verify_site_ledger(work_dir, Path(cfg.heads) if cfg.heads else None, public_key)
    if cfg.action == "show":
        for line_no, entry in enumerate(ledger.entries(), start=1):
            try:
                print(describe(entry))
            except (KeyError, TypeError, AttributeError, ValueError):
                print(f"{'?':>5}  line {line_no} is not a ledger entry")
    for problem in problems:
        print(f"TAMPERED: {problem}")
    if problems:
        return 1
    seq, head = ledger.head()
    against = f", consistent with {cfg.heads}" if cfg.heads else ""
    print(f"{ledger.path}: intact{against}; {seq} entries, head {head[:12]}..., key {ledger.key_id}")
    return 0


@hydra.main(config_path="../conf", config_name="ledger", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors(False, LedgerCorrupted):
        status = run(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
