"""A data owner's decision on a job, signed with the site's own key, and the gate before training.

The decision is an Ed25519 signature by the site's key (:mod:`pipeline.governance.keys`) over
the decision and the job hash, stored in ``<work dir>/approvals/<job hash>.json`` and entered in
the site's ledger. Whatever channel carried the request, a site trains only in a job whose
exact hash it approved with its own key.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from omegaconf import DictConfig

from pipeline.governance.job import Job
from pipeline.governance.keys import site_signing_key
from pipeline.governance.ledger import SiteLedger

log = logging.getLogger("fedrad.governance")

APPROVALS_DIR = "approvals"
Decision = Literal["approval", "rejection"]
REVIEW_HINT = (
    "the site's data owner reviews it with `python scripts/review_job.py +site=<this site> "
    "action=show job={job}` and decides with action=approve or action=reject"
)


class JobNotApproved(PermissionError):
    """A site was asked to train in a job its data owner has not approved."""


@dataclass(frozen=True)
class JobDecision:
    """What ``approvals/<job hash>.json`` holds."""

    job_hash: str
    decision: Decision
    summary: str
    decided_by: str
    decided_at: str
    signature: str

    @staticmethod
    def signed_bytes(job_hash: str, decision: Decision) -> bytes:
        """What the site key signs: the decision is signed too, so a rejection is never an approval."""
        return f"fedrad job {decision}\n{job_hash}".encode()

    def verify(self, public_key: Ed25519PublicKey) -> None:
        """Raises ``InvalidSignature`` unless ``public_key`` signed this decision on this job."""
        public_key.verify(bytes.fromhex(self.signature), self.signed_bytes(self.job_hash, self.decision))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "JobDecision":
        return cls(**json.loads(text))


def decision_path(work_dir: Path, job_hash: str) -> Path:
    return Path(work_dir) / APPROVALS_DIR / f"{job_hash}.json"


def decide(work_dir: Path, job: Job, decision: Decision, decided_by: str) -> JobDecision:
    """Sign ``decision`` on ``job`` with the site's key, store it and enter it in the ledger."""
    if decision not in ("approval", "rejection"):
        raise ValueError(f"decision must be 'approval' or 'rejection', not {decision!r}")
    key = site_signing_key(Path(work_dir))
    record = JobDecision(
        job_hash=job.job_hash,
        decision=decision,
        summary=job.summary(),
        decided_by=decided_by,
        decided_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        signature=key.sign(JobDecision.signed_bytes(job.job_hash, decision)).hex(),
    )
    path = decision_path(work_dir, job.job_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.to_json())
    SiteLedger.for_site(work_dir).append(
        decision, {"job_hash": job.job_hash, "summary": record.summary, "decided_by": decided_by}
    )
    log.info("job %s: %s by %s (%s)", job.job_hash, decision, decided_by, record.summary)
    return record


def recorded_decision(work_dir: Path, job_hash: str) -> JobDecision | None:
    """The stored decision on ``job_hash`` if its signature is the site's own; else ``None``.

    Raises :class:`JobNotApproved` when a decision file exists but is not validly signed.
    """
    path = decision_path(work_dir, job_hash)
    if not path.is_file():
        return None
    try:
        record = JobDecision.from_json(path.read_text())
        if record.job_hash != job_hash:
            raise ValueError(f"it is about job {record.job_hash}")
        record.verify(site_signing_key(Path(work_dir)).public_key())
    except (InvalidSignature, ValueError, TypeError, KeyError) as problem:
        raise JobNotApproved(
            f"{path} is not a decision signed by this site's key ({problem or 'bad signature'}): "
            f"job {job_hash} counts as not approved; " + REVIEW_HINT.format(job=job_hash)
        ) from None
    return record


def require_approval(work_dir: Path, job: Job) -> JobDecision:
    """The site's signed approval of exactly ``job``; raises :class:`JobNotApproved` otherwise."""
    record = recorded_decision(work_dir, job.job_hash)
    if record is None:
        raise JobNotApproved(
            f"this site has not approved job {job.job_hash} ({job.summary()}), so it does not "
            "train: " + REVIEW_HINT.format(job=job.job_hash)
        )
    if record.decision != "approval":
        raise JobNotApproved(
            f"this site's data owner rejected job {job.job_hash} on {record.decided_at} "
            f"({record.decided_by}), so it does not train"
        )
    return record


def site_governance(node_config: dict, cfg: DictConfig) -> dict:
    """The approval policy a site applies to a received config, and the job as received.

    A deployed site (``cache-dir`` in its node config) decides for itself: its node config's
    ``require-approval`` (default true) and ``auto-approve`` (default false), set by
    ``scripts/site.py`` from the site's own ``governance`` config; whatever ``governance`` the
    coordinator sent is ignored. A simulated site (one operator playing every site) follows the
    operator's ``governance`` config as sent. The job is fixed here, before the site adjusts
    anything of its own (e.g. a tighter epsilon budget), so it is the job the coordinator proposed.
    """
    if "cache-dir" in node_config:
        policy = {
            "require_approval": bool(node_config.get("require-approval", True)),
            "auto_approve_simulated_sites": bool(node_config.get("auto-approve", False)),
        }
    else:
        policy = dict(cfg.get("governance") or {})
    return policy | {"received_job": Job.from_config(cfg).to_json()}


def enforce_approval(cfg: DictConfig, work_dir: Path) -> None:
    """The gate before a site trains, by ``cfg.governance`` (default: approval required).

    With ``auto_approve_simulated_sites`` (demo presets, one operator playing every site) the
    simulated data owner approves an undecided job with the site's key first; a rejection stands.
    """
    policy = cfg.get("governance") or {}
    site = Path(work_dir).resolve().parent.name
    if not policy.get("require_approval", True):
        log.warning("site %s trains without job approval (governance.require_approval=false)", site)
        return
    received = policy.get("received_job")
    job = Job.from_json(received) if received else Job.from_config(cfg)
    try:
        if policy.get("auto_approve_simulated_sites") and recorded_decision(work_dir, job.job_hash) is None:
            decide(work_dir, job, "approval", decided_by=f"simulated data owner of {site} (auto-approve)")
            log.warning("site %s: job %s approved by the site's simulated data owner "
                        "(governance.auto_approve_simulated_sites)", site, job.job_hash)
        require_approval(work_dir, job)
    except JobNotApproved as refusal:
        log.error("site %s refuses to train: %s", site, refusal)
        raise
