"""The two ends of job approval: the coordinator submits a job to every site, each site's data
owner lists, reads and decides (``scripts/submit_job.py``, ``scripts/review_job.py``).

A data owner decides on a pending request (approve or reject), and can later withdraw an
approval (``action=withdraw``, or ``action=reject`` on an approved job) or approve a rejected or
withdrawn job again (``action=approve``). What counts is the latest decision in the site's own
signed ledger (:func:`pipeline.governance.approval.current_decision`); decided jobs are found
there, not in the request channel, which only carries the signed decision back when it can."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from pipeline.governance.approval import (
    Decision,
    JobDecision,
    LedgerDecision,
    ledger_decisions,
    recorded_decision,
    sign_decision,
)
from pipeline.governance.code_hash import CODE_HASH_COVERS, code_hash
from pipeline.governance.job import Job
from pipeline.governance.request_folder import FolderChannel
from pipeline.governance.site_ledger import LedgerCorrupted

DECISIONS: dict[str, Decision] = {"approve": "approval", "reject": "rejection", "withdraw": "withdrawal"}
ACTIONS = ("list", "show", *DECISIONS)


class JobChannel(Protocol):
    """How job requests reach one site and its decisions come back."""

    def submit(self, job: Job) -> None: ...
    def pending(self) -> list[Job]: ...
    def answer(self, work_dir: Path, job_hash: str, decision: Decision, decided_by: str) -> JobDecision: ...
    def decision(self, job_hash: str) -> JobDecision | None: ...


def open_channel(requests: DictConfig, site: str, data_owner: bool) -> JobChannel:
    """The channel to ``site``, opened by its data owner or (``data_owner=False``) the coordinator."""
    if requests.channel == "folder":
        return FolderChannel(Path(requests.folder) / site)
    if requests.channel == "syft":
        from syft_rds import login_do, login_ds

        from pipeline.governance.syft_channel import SyftChannel

        login = login_do if data_owner else login_ds
        client = login(email=requests.email, token_path=requests.token_path)
        site_email = requests.email if data_owner else requests.site_emails.get(site)
        if site_email is None:
            raise KeyError(f"job_requests.site_emails has no datasite email for site {site!r}")
        return SyftChannel(client, site_email)
    raise ValueError(f"job_requests.channel must be 'folder' or 'syft', not {requests.channel!r}")


def submit_job(cfg: DictConfig) -> str:
    """Coordinator: submit the job of ``cfg`` to every site in ``data.sites``; a report."""
    job = Job.from_config(cfg)
    for site in cfg.data.sites:
        open_channel(cfg.job_requests, site, data_owner=False).submit(job)
    return (
        f"{job.render()}\n\nsubmitted job {job.job_hash} to {', '.join(cfg.data.sites)}; "
        "each site's data owner reviews it with scripts/review_job.py. See the decisions with "
        "scripts/submit_job.py action=status (same experiment overrides)."
    )


def job_status(cfg: DictConfig) -> str:
    """Coordinator: each site's decision on the job of ``cfg``."""
    job = Job.from_config(cfg)
    lines = [f"job {job.job_hash} ({job.summary()})"]
    for site in cfg.data.sites:
        decision = open_channel(cfg.job_requests, site, data_owner=False).decision(job.job_hash)
        state = "pending" if decision is None else f"{decision.decision} ({decision.decided_at})"
        lines.append(f"  {site}: {state}")
    return "\n".join(lines)


def _latest_decisions(work_dir: Path) -> dict[str, LedgerDecision]:
    """Job hash -> the latest decision on it in the site's verified ledger."""
    return {d.job_hash: d for d in ledger_decisions(work_dir)}


def _find_job(
    channel: JobChannel, work_dir: Path, prefix: object
) -> tuple[str, Job | None, LedgerDecision | None]:
    """(hash, pending request or ``None``, latest ledger decision or ``None``) of the one job,
    pending or decided at this site, whose hash starts with ``prefix``."""
    if prefix is None or str(prefix) == "":
        raise ValueError("name the job: job=<job hash or a unique prefix> (see action=list)")
    prefix = str(prefix)
    pending = {job.job_hash: job for job in channel.pending()}
    decided = _latest_decisions(work_dir)
    matches = sorted(h for h in pending.keys() | decided.keys() if h.startswith(prefix))
    if len(matches) != 1:
        found = "no job" if not matches else f"{len(matches)} jobs"
        raise LookupError(
            f"{found} pending or decided at this site matches job={prefix}: see the jobs with action=list"
        )
    job_hash = matches[0]
    return job_hash, pending.get(job_hash), decided.get(job_hash)


def _code_note(job: Job) -> str:
    if job.code_hash == code_hash():
        return "This site runs the same fedrad code and installed packages (code hash matches)."
    return (
        f"WARNING: this site runs other code (code hash {code_hash()}; it covers {CODE_HASH_COVERS}): "
        "even if approved, this site will not train in this job until both run the same code."
    )


def _state(decision: LedgerDecision | None) -> str:
    if decision is None:
        return "undecided"
    return f"{decision.decision} on {decision.time} by {decision.decided_by} (ledger entry {decision.seq})"


def _list(channel: JobChannel, site_name: str, work_dir: Path) -> str:
    pending = channel.pending()
    if not pending:
        lines = [f"no job waits for the review of {site_name}'s data owner"]
    else:
        lines = [f"{len(pending)} job(s) wait for review (show one with action=show job=<hash>):"]
        lines += [f"  {job.job_hash[:16]}  {job.summary()}" for job in pending]
    try:
        decided = _latest_decisions(work_dir)
    except LedgerCorrupted as error:
        return "\n".join(lines + [f"decided jobs unknown: {error}"])
    if decided:
        lines.append("decided at this site (latest signed decision in its ledger):")
        lines += [f"  {h[:16]}  {_state(d)}  {d.summary}" for h, d in decided.items()]
    return "\n".join(lines)


def _send(
    channel: JobChannel, work_dir: Path, job_hash: str, summary: str, decision: Decision, decided_by: str
) -> tuple[JobDecision, str]:
    """Sign ``decision`` through the channel (which sends it back), or at the site only when the
    channel cannot carry it (e.g. a syft request no longer pending); (record, how it went)."""
    try:
        return channel.answer(work_dir, job_hash, decision, decided_by), "and sent"
    except LookupError as why:
        record = sign_decision(work_dir, job_hash, summary, decision, decided_by)
        return record, (
            f"at this site; the request channel cannot carry it ({why}), so the "
            "coordinator sees it when this site refuses to train"
        )


def review(cfg: DictConfig, site_name: str, work_dir: Path) -> str:
    """Site's data owner: list jobs, show one, approve, reject or withdraw; a report.

    ``approve`` signs an approval of a pending job, or a new approval of a job this site
    rejected or withdrew; ``reject`` signs a rejection, or a withdrawal when the job's latest
    decision is an approval; ``withdraw`` withdraws an approval (and refuses otherwise).
    """
    channel = open_channel(cfg.job_requests, site_name, data_owner=True)
    action = cfg.action or "list"
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if action == "list":
        return _list(channel, site_name, work_dir)
    job_hash, job, latest = _find_job(channel, work_dir, cfg.job)
    if job is None:
        assert latest is not None  # _find_job matches pending or decided jobs: this one was decided
        summary = latest.summary
    else:
        summary = job.summary()
    if action == "show":
        state = f"This site's decision: {_state(latest)}."
        if job is None:
            assert latest is not None  # as above
            history = [f"  {_state(d)}" for d in ledger_decisions(work_dir) if d.job_hash == job_hash]
            hint = (
                "Withdraw the approval with action=withdraw"
                if latest.decision == "approval"
                else "Approve it again with action=approve"
            )
            return "\n".join(
                [
                    f"Training job {job_hash}",
                    f"  {summary}",
                    state,
                    "Decisions (oldest first):",
                    *history,
                    f"{hint} job={job_hash[:16]}",
                ]
            )
        return (
            f"{job.render()}\n\n{_code_note(job)}\n{state}\n"
            f"Decide with action=approve or action=reject job={job_hash[:16]}"
        )
    decision = DECISIONS[action]
    approved = latest is not None and latest.decision == "approval"
    if action == "reject" and approved:
        decision = "withdrawal"  # a rejection of an approved job withdraws the approval
    if decision == "withdrawal" and not approved:
        raise LookupError(
            f"job {job_hash} is not approved at this site ({_state(latest)}): "
            "there is no approval to withdraw"
        )
    if decision == "approval" and approved:
        try:
            valid = recorded_decision(work_dir, job_hash)
        except PermissionError:
            valid = None
        if valid is not None and valid.decision == "approval":
            return f"{site_name}: job {job_hash} is already approved ({_state(latest)}); nothing signed"
    who = f"data owner of {site_name}"
    record, how = _send(channel, work_dir, job_hash, summary, decision, who)
    return f"{site_name}: {record.decision} of job {job_hash} signed with the site's key {how}"
