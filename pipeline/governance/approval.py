"""A data owner's decisions on a job, signed with the site's own key, and the gate before training.

A decision (``approval``, ``rejection`` or ``withdrawal`` of an approval) is an Ed25519 signature
by the site's key (:mod:`pipeline.governance.keys`) over ``fedrad job <decision>\n<job hash>``.
Each decision is entered in the site's signed ledger (kind = the decision; body: job hash,
summary, who decided) and the latest one is kept, signed, in ``<work dir>/approvals/<job
hash>.json`` (what goes back to the coordinator). The ledger holds the history and is the
authority: a site trains in a job only if

* the site's ledger verifies (every entry, against the key derived from the site's own private
  key), and the latest decision entry on exactly that job hash is an ``approval``; and
* ``approvals/<job hash>.json`` is that approval, validly signed by the site's key.

So a withdrawal (or a rejection) stands even if an older approval file is restored, and a
withdrawn job trains again only after a new, explicit approval, which is then the latest
decision. Whatever channel carried the request, a site trains only in a job whose exact hash it
approved with its own key. The gate checks the ledger against every head the site has
reported (``private/reported_heads.jsonl``), so a ledger cut back to before a withdrawal is
caught once a later head was reported; no local check catches someone with write access to the
site's files who cuts the ledger back to before a withdrawal made after the last reported head
(a truncated tail is a valid chain) and restores the approval file, or who also edits the heads
file; verifying against the coordinator's heads (``scripts/ledger.py heads=...``) helps there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from omegaconf import DictConfig

from pipeline.contracts.files import atomic_write
from pipeline.contracts.layout import WorkDir
from pipeline.contracts.messages import NodeConfig
from pipeline.governance.job import Job
from pipeline.governance.keys import site_signing_key
from pipeline.governance.rounds import reported_heads
from pipeline.governance.site_ledger import Head, LedgerCorrupted, SiteLedger

log = logging.getLogger("fedrad.governance")

Decision = Literal["approval", "rejection", "withdrawal"]
DECISIONS: tuple[Decision, ...] = ("approval", "rejection", "withdrawal")
REVIEW_HINT = (
    "the site's data owner reviews it with `python scripts/review_job.py +site=<this site> "
    "action=show job={job}` and decides with action=approve or action=reject"
)
JOB_HASH = re.compile(r"[0-9a-f]{64}")


class JobNotApproved(PermissionError):
    """A site was asked to train in a job its data owner has not approved."""


@dataclass(frozen=True)
class JobDecision:
    """What ``approvals/<job hash>.json`` holds: the latest decision, signed."""

    job_hash: str
    decision: Decision
    summary: str
    decided_by: str
    decided_at: str
    signature: str

    @staticmethod
    def signed_bytes(job_hash: str, decision: Decision) -> bytes:
        """What the site key signs: the decision is signed too, so a rejection or a withdrawal
        is never an approval."""
        return f"fedrad job {decision}\n{job_hash}".encode()

    def verify(self, public_key: Ed25519PublicKey) -> None:
        """Raises ``InvalidSignature`` unless ``public_key`` signed this decision on this job."""
        public_key.verify(bytes.fromhex(self.signature), self.signed_bytes(self.job_hash, self.decision))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "JobDecision":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class LedgerDecision:
    """One decision on a job as an entry of the site's verified ledger holds it."""

    job_hash: str
    decision: Decision
    summary: str
    decided_by: str
    time: str  # when it was entered in the ledger (UTC)
    seq: int  # its entry number

    @classmethod
    def from_entry(cls, entry: dict) -> "LedgerDecision":
        body = entry["body"]
        return cls(
            job_hash=str(body.get("job_hash")),
            decision=entry["kind"],
            summary=str(body.get("summary", "")),
            decided_by=str(body.get("decided_by", "?")),
            time=entry["time"],
            seq=entry["seq"],
        )


def decision_path(work_dir: Path, job_hash: str) -> Path:
    if not JOB_HASH.fullmatch(str(job_hash)):
        raise ValueError(f"{job_hash!r} is not a job hash (64 lowercase hex digits)")
    return WorkDir(Path(work_dir)).approval(job_hash)


def sign_decision(
    work_dir: Path, job_hash: str, summary: str, decision: Decision, decided_by: str
) -> JobDecision:
    """Sign ``decision`` on ``job_hash`` with the site's key, enter it in the site's ledger (the
    authority), then keep it as the job's latest decision file; returns the signed decision."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    path = decision_path(work_dir, job_hash)
    key = site_signing_key(Path(work_dir))
    record = JobDecision(
        job_hash=job_hash,
        decision=decision,
        summary=summary,
        decided_by=decided_by,
        decided_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        signature=key.sign(JobDecision.signed_bytes(job_hash, decision)).hex(),
    )
    SiteLedger.for_site(work_dir).append(
        decision, {"job_hash": job_hash, "summary": summary, "decided_by": decided_by}
    )
    atomic_write(path, record.to_json().encode())
    log.info("job %s: %s by %s (%s)", job_hash, decision, decided_by, summary)
    return record


def decide(work_dir: Path, job: Job, decision: Decision, decided_by: str) -> JobDecision:
    """Sign ``decision`` on ``job`` with the site's key, enter it in the ledger and store it."""
    return sign_decision(work_dir, job.job_hash, job.summary(), decision, decided_by)


def withdraw(work_dir: Path, job_hash: str, decided_by: str) -> JobDecision:
    """Withdraw the site's approval of ``job_hash``: sign a ``withdrawal`` and enter it in the
    ledger; from then on :func:`require_approval` refuses the job until a new approval.
    Raises ``LookupError`` unless the job's latest decision in the verified ledger is an approval."""
    latest = current_decision(work_dir, job_hash)
    if latest is None or latest.decision != "approval":
        state = (
            "undecided" if latest is None else f"its latest decision is a {latest.decision} of {latest.time}"
        )
        raise LookupError(f"job {job_hash} is not approved at this site ({state}): no approval to withdraw")
    return sign_decision(work_dir, job_hash, latest.summary, "withdrawal", decided_by)


def ledger_decisions(work_dir: Path, expected_heads: Iterable[Head] | None = None) -> list[LedgerDecision]:
    """Every decision on any job in the site's ledger, oldest first, once the whole ledger
    verifies against the site's own key (and ``expected_heads``, e.g. the heads the site
    reported); raises :class:`LedgerCorrupted` (one line) otherwise."""
    entries = SiteLedger.for_site(work_dir).verified_entries(expected_heads)
    return [LedgerDecision.from_entry(e) for e in entries if e["kind"] in DECISIONS]


def decision_history(
    work_dir: Path, job_hash: str, expected_heads: Iterable[Head] | None = None
) -> list[LedgerDecision]:
    """The decisions on ``job_hash`` in the site's verified ledger, oldest first."""
    return [d for d in ledger_decisions(work_dir, expected_heads) if d.job_hash == job_hash]


def current_decision(
    work_dir: Path, job_hash: str, expected_heads: Iterable[Head] | None = None
) -> LedgerDecision | None:
    """The latest decision on ``job_hash`` in the site's verified ledger (``None``: undecided).

    This is the job's state at the site: ``approval`` (the site trains in it, given a valid
    approval file), ``rejection`` or ``withdrawal``. Raises :class:`LedgerCorrupted`."""
    history = decision_history(work_dir, job_hash, expected_heads)
    return history[-1] if history else None


def recorded_decision(work_dir: Path, job_hash: str) -> JobDecision | None:
    """The stored decision file on ``job_hash`` if its signature is the site's own; else ``None``.

    Raises :class:`JobNotApproved` when a decision file exists but is not validly signed. On its
    own it says nothing about the job's state (an older file may have been restored): see
    :func:`current_decision` and :func:`require_approval`.
    """
    path = decision_path(work_dir, job_hash)
    if not path.is_file():
        return None
    public_key = site_signing_key(Path(work_dir)).public_key()  # a bad key file is its own error
    try:
        record = JobDecision.from_json(path.read_text())
        if record.job_hash != job_hash:
            raise ValueError(f"it is about job {record.job_hash}")
        if record.decision not in DECISIONS:
            raise ValueError(f"unknown decision {record.decision!r}")
        record.verify(public_key)
    except (InvalidSignature, ValueError, TypeError, KeyError, AttributeError) as problem:
        raise JobNotApproved(
            f"{path} is not a decision signed by this site's key ({problem or 'bad signature'}): "
            f"job {job_hash} counts as not approved; " + REVIEW_HINT.format(job=job_hash)
        ) from None
    return record


def _ledger_state(work_dir: Path, job_hash: str) -> LedgerDecision | None:
    """:func:`current_decision`, checked against every ledger head the site has reported (a
    ledger cut back to before a withdrawal that was followed by a reported head is caught), a
    ledger that does not verify being a refusal."""
    try:
        return current_decision(work_dir, job_hash, reported_heads(work_dir))
    except LedgerCorrupted as error:
        raise JobNotApproved(
            f"no approval counts while this site's ledger does not verify, so it does not train "
            f"in job {job_hash}: {error}"
        ) from None


def require_approval(work_dir: Path, job: Job) -> JobDecision:
    """The site's signed approval of exactly ``job``; raises :class:`JobNotApproved` otherwise.

    The latest decision on the job in the site's verified ledger must be an approval, and the
    job's decision file that approval, validly signed by the site's key.
    """
    job_hash = job.job_hash
    record = recorded_decision(work_dir, job_hash)
    latest = _ledger_state(work_dir, job_hash)
    if latest is None:
        orphan = (
            (
                f"; {decision_path(work_dir, job_hash)} holds a signed {record.decision}, but the "
                "site's ledger, which is the authority, has no decision on this job"
            )
            if record is not None
            else ""
        )
        raise JobNotApproved(
            f"this site has not approved job {job_hash} ({job.summary()}){orphan}, so it does not "
            "train: " + REVIEW_HINT.format(job=job_hash)
        )
    if latest.decision == "rejection":
        raise JobNotApproved(
            f"this site's data owner rejected job {job_hash} on {latest.time} "
            f"({latest.decided_by}), so it does not train"
        )
    if latest.decision == "withdrawal":
        raise JobNotApproved(
            f"this site's data owner withdrew the approval of job {job_hash} on {latest.time} "
            f"({latest.decided_by}; ledger entry {latest.seq}), so it does not train; only a new "
            f"approval counts: `python scripts/review_job.py +site=<this site> action=approve "
            f"job={job_hash[:16]}`"
        )
    if record is None or record.decision != "approval":
        found = "is missing" if record is None else f"holds a {record.decision}"
        raise JobNotApproved(
            f"this site's ledger approves job {job_hash} (entry {latest.seq}, {latest.time}) but "
            f"{decision_path(work_dir, job_hash)} {found}: the approval counts only with both, so "
            "the site does not train; " + REVIEW_HINT.format(job=job_hash)
        )
    return record


def site_governance(node_config: dict, cfg: DictConfig) -> dict:
    """The approval policy a site applies to a received config, and the job as received.

    A deployed site (a :class:`pipeline.contracts.messages.NodeConfig`) decides for itself: its node config's
    ``require-approval`` (default true) and ``auto-approve`` (default false), set by
    ``scripts/site.py`` from the site's own ``governance`` config; whatever ``governance`` the
    coordinator sent is ignored. A simulated site (one operator playing every site) follows the
    operator's ``governance`` config as sent. The job is fixed here, before the site adjusts
    anything of its own (e.g. a tighter epsilon budget), so it is the job the coordinator proposed.
    """
    site = NodeConfig.read(node_config)
    if site is not None:
        policy = {
            "require_approval": site.require_approval,
            "auto_approve_simulated_sites": site.auto_approve,
        }
    else:
        policy = dict(cfg.get("governance") or {})
    return policy | {"received_job": Job.from_config(cfg).to_json()}


def enforce_approval(cfg: DictConfig, work_dir: Path) -> None:
    """The gate before a site trains, by ``cfg.governance`` (default: approval required).

    With ``auto_approve_simulated_sites`` (demo presets, one operator playing every site) the
    simulated data owner approves an undecided job with the site's key first: a job with any
    decision in the site's ledger (a rejection, a withdrawal) or a decision file is not undecided.
    """
    policy = cfg.get("governance") or {}
    site = WorkDir(Path(work_dir)).site_name
    if not policy.get("require_approval", True):
        log.warning("site %s trains without job approval (governance.require_approval=false)", site)
        return
    received = policy.get("received_job")
    job = Job.from_json(received) if received else Job.from_config(cfg)
    try:
        if (
            policy.get("auto_approve_simulated_sites")
            and _ledger_state(work_dir, job.job_hash) is None
            and recorded_decision(work_dir, job.job_hash) is None
        ):
            decide(work_dir, job, "approval", decided_by=f"simulated data owner of {site} (auto-approve)")
            log.warning(
                "site %s: job %s approved by the site's simulated data owner "
                "(governance.auto_approve_simulated_sites)",
                site,
                job.job_hash,
            )
        require_approval(work_dir, job)
    except JobNotApproved as refusal:
        log.error("site %s refuses to train: %s", site, refusal)
        raise
