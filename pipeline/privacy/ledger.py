"""A site's persistent privacy accounting: every DP-SGD round it trained, on its own disk.

The rounds themselves are ``round`` entries of the site's signed ledger
(:mod:`pipeline.governance.ledger`), each with the Opacus accountant history of the round and
the cumulative epsilon at the site's delta after it. ``<site work dir>/privacy_ledger.json``
(next to the site's ``cache`` folder) lists which ``run:round`` keys count against the budget;
for each, the latest signed entry of that key is read, so that a round trained again replaces
its charge instead of adding to it. Nothing resets it: a restarted site, or a new federation
run, keeps adding to the same ledger, and the site refuses to train once the next round would
take it past its budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.files import atomic_write
from pipeline.governance.ledger import LEDGER_NAME as SIGNED_LEDGER_NAME
from pipeline.governance.ledger import SiteLedger
from pipeline.governance.rounds import round_key
from pipeline.privacy.dp import RoundPlan, epsilon_of

LEDGER_NAME = "privacy_ledger.json"


class PrivacyBudgetExhausted(RuntimeError):
    """The site's next round would exceed its epsilon budget: it does not train."""


class PrivacyLedger:
    """The privacy accounting of one site (see the module docstring)."""

    def __init__(self, path: Path, accountant: str) -> None:
        self.path = Path(path)
        self.accountant = accountant
        self.signed = SiteLedger(self.path.parent / SIGNED_LEDGER_NAME)
        keys = json.loads(self.path.read_text())["rounds"] if self.path.is_file() else []
        self.entries: list[dict] = self._signed_rounds(keys)

    @classmethod
    def for_cache(cls, cache_dir: Path, accountant: str) -> "PrivacyLedger":
        """The ledger in the site's work dir: the parent of its cache folder."""
        return cls(Path(cache_dir).parent / LEDGER_NAME, accountant)

    @staticmethod
    def key(run_id: str, server_round: int) -> str:
        return round_key(run_id, server_round)

    def _signed_rounds(self, keys: list[str]) -> list[dict]:
        """The body (with its ``key``) of the latest signed DP round entry of each key."""
        latest = {
            self.key(e["body"]["run"], e["body"]["round"]): e["body"]
            for e in self.signed.entries() if e["kind"] == "round" and "history" in e["body"]
        }
        missing = [k for k in keys if k not in latest]
        if missing:
            raise ValueError(
                f"{self.path} charges rounds {missing} that have no DP round entry in "
                f"{self.signed.path}: check it with scripts/ledger.py action=verify"
            )
        return [latest[k] | {"key": k} for k in keys]

    def history(self, excluding: str | None = None) -> list[list]:
        """Accountant history of every recorded round (optionally all but one key)."""
        return [step for e in self.entries if e["key"] != excluding for step in e["history"]]

    def spent(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` over every recorded round."""
        return epsilon_of(self.history(), delta, self.accountant)

    def check_budget(self, run_id: str, server_round: int, plan: RoundPlan, budget: float) -> float:
        """Epsilon after this round if trained; raises if that exceeds ``budget``."""
        key = self.key(run_id, server_round)
        spent = epsilon_of(self.history(excluding=key), plan.delta, self.accountant)
        after = epsilon_of(self.history(excluding=key) + plan.history, plan.delta, self.accountant)
        if after > budget:
            raise PrivacyBudgetExhausted(
                f"privacy budget: this site has spent epsilon={spent:.3f} (delta={plan.delta:.2g}, "
                f"{len(self.entries)} rounds in {self.path}); round {server_round} would bring it "
                f"to {after:.3f} > privacy.epsilon_budget={budget:g}, so the site does not train "
                "(the federation goes on without it while federation.min_sites remain)"
            )
        return after

    def charge(self, run_id: str, server_round: int, history: list, delta: float) -> dict:
        """The privacy fields of a trained round's ledger entry: its accountant ``history``
        and the cumulative ``epsilon`` at ``delta`` once it replaces any charge of its key."""
        history = [list(step) for step in history]
        before = self.history(excluding=self.key(run_id, server_round))
        epsilon = epsilon_of(before + history, delta, self.accountant)
        return {"epsilon": epsilon, "delta": delta, "accountant": self.accountant, "history": history}

    def record(self, entry: dict) -> float:
        """Count a signed ``round`` entry (made with :meth:`charge`'s fields) against the
        budget, replacing the charge of the same ``run:round``; returns the cumulative epsilon.
        The key list is replaced atomically."""
        key = self.key(entry["body"]["run"], entry["body"]["round"])
        keys = [e["key"] for e in self.entries if e["key"] != key] + [key]
        self.entries = self._signed_rounds(keys)
        atomic_write(self.path, json.dumps({"rounds": keys}, indent=1).encode())
        return float(entry["body"]["epsilon"])
