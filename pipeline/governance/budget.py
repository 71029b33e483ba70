"""A site's privacy accounting, computed from its signed ledger alone.

Every DP-SGD round a site trains is a signed ``round`` entry of its ledger
(:mod:`pipeline.governance.site_ledger`) holding the round's Opacus accountant ``history`` and the
cumulative epsilon after it. The epsilon a site has spent is composed over *every* such entry,
read from the ledger only after it verifies (hashes, signatures, links, and the heads the site
reported; :func:`pipeline.governance.rounds.verified_entries`): no unsigned file can lower it, a
round trained twice is charged twice, and a ledger that fails verification blocks training.
Nothing resets it: a restarted site, or a new federation run, keeps adding to the same ledger,
and the site refuses to train once the next round would take it past its budget.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.contracts.layout import WorkDir
from pipeline.governance.rounds import verified_entries
from pipeline.privacy.dp import RoundPlan, epsilon_of


class PrivacyBudgetExhausted(RuntimeError):
    """The site's next round would exceed its epsilon budget: it does not train."""


class PrivacyLedger:
    """The privacy accounting of one site (see the module docstring)."""

    def __init__(self, work_dir: Path, accountant: str) -> None:
        self.work_dir = Path(work_dir)
        self.accountant = accountant
        self.entries: list[dict] = [
            e["body"]
            for e in verified_entries(self.work_dir)
            if e["kind"] == "round" and "history" in e["body"]
        ]

    @classmethod
    def for_cache(cls, cache_dir: Path, accountant: str) -> "PrivacyLedger":
        """The accounting of the site whose cache folder is ``cache_dir``."""
        return cls(WorkDir.of_cache(cache_dir).root, accountant)

    def history(self) -> list[list]:
        """Accountant history of every signed DP round."""
        return [step for body in self.entries for step in body["history"]]

    def spent(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` over every signed DP round."""
        return epsilon_of(self.history(), delta, self.accountant)

    def check_budget(self, server_round: int, plan: RoundPlan, budget: float) -> float:
        """Epsilon after this round if trained; raises if that exceeds ``budget``."""
        spent = self.spent(plan.delta)
        after = epsilon_of([*self.history(), *plan.history], plan.delta, self.accountant)
        if after > budget:
            raise PrivacyBudgetExhausted(
                f"privacy budget: this site has spent epsilon={spent:.3f} (delta={plan.delta:.2g}, "
                f"{len(self.entries)} signed DP rounds in its ledger); round {server_round} would "
                f"bring it to {after:.3f} > privacy.epsilon_budget={budget:g}, so the site does not "
                "train (the federation goes on without it while federation.min_sites remain)"
            )
        return after

    def charge(self, history: list, delta: float) -> dict:
        """The privacy fields of a trained round's ledger entry: its accountant ``history`` and
        the cumulative ``epsilon`` at ``delta`` with it added to every round before."""
        history = [list(step) for step in history]
        epsilon = epsilon_of(self.history() + history, delta, self.accountant)
        return {"epsilon": epsilon, "delta": delta, "accountant": self.accountant, "history": history}
