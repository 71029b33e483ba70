"""A site's persistent privacy ledger: every DP-SGD round it trained, on its own disk.

``<site work dir>/privacy_ledger.json`` (next to the site's ``cache`` folder) holds one entry
per round, keyed by run id and round so that a round is never charged twice: the Opacus
accountant history of the round, and the cumulative epsilon at the site's delta after it.
Nothing resets it: a restarted site, or a new federation run, keeps adding to the same ledger,
and the site refuses to train once the next round would take it past its budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.privacy.dp import RoundPlan, epsilon_of

LEDGER_NAME = "privacy_ledger.json"


class PrivacyBudgetExhausted(RuntimeError):
    """The site's next round would exceed its epsilon budget: it does not train."""


class PrivacyLedger:
    """The ledger file of one site (see the module docstring)."""

    def __init__(self, path: Path, accountant: str) -> None:
        self.path = Path(path)
        self.accountant = accountant
        self.entries: list[dict] = (
            json.loads(self.path.read_text())["rounds"] if self.path.is_file() else []
        )

    @classmethod
    def for_cache(cls, cache_dir: Path, accountant: str) -> "PrivacyLedger":
        """The ledger in the site's work dir: the parent of its cache folder."""
        return cls(Path(cache_dir).parent / LEDGER_NAME, accountant)

    @staticmethod
    def key(run_id: str, server_round: int) -> str:
        return f"{run_id}:{server_round}"

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

    def record(self, run_id: str, server_round: int, history: list, delta: float) -> float:
        """Charge a trained round (replacing an entry with the same key); returns the
        cumulative epsilon at ``delta``. The file is replaced atomically."""
        key = self.key(run_id, server_round)
        self.entries = [e for e in self.entries if e["key"] != key]
        self.entries.append({"key": key, "run": run_id, "round": server_round,
                             "history": [list(step) for step in history]})
        epsilon = self.spent(delta)
        self.entries[-1].update(epsilon=epsilon, delta=delta, accountant=self.accountant)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"rounds": self.entries}, indent=1))
        os.replace(partial, self.path)
        return epsilon
