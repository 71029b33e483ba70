"""The two ends of job approval: the coordinator submits a job to every site, each site's data
owner lists, reads and decides (``scripts/submit_job.py``, ``scripts/review_job.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from pipeline.governance.approval import Decision, JobDecision
from pipeline.governance.code_hash import code_hash
from pipeline.governance.job import Job
from pipeline.governance.request_folder import FolderChannel

DECISIONS: dict[str, Decision] = {"approve": "approval", "reject": "rejection"}


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


def _pending_job(channel: JobChannel, prefix: str | None) -> Job:
    """The one pending job whose hash starts with ``prefix``."""
    if not prefix:
        raise ValueError("name the job: job=<job hash or a unique prefix> (see action=list)")
    matches = [job for job in channel.pending() if job.job_hash.startswith(str(prefix))]
    if len(matches) != 1:
        found = "no pending job" if not matches else f"{len(matches)} pending jobs"
        raise LookupError(f"{found} matches job={prefix}: see the pending jobs with action=list")
    return matches[0]


def _code_note(job: Job) -> str:
    if job.code_hash == code_hash():
        return "This site runs the same fedrad code (code hash matches)."
    return (
        f"WARNING: this site runs other fedrad code (code hash {code_hash()}): even if approved, "
        "this site will not train in this job until both run the same code."
    )


def review(cfg: DictConfig, site_name: str, work_dir: Path) -> str:
    """Site's data owner: list pending jobs, show one, approve or reject it; a report."""
    channel = open_channel(cfg.job_requests, site_name, data_owner=True)
    action = cfg.action or "list"
    if action == "list":
        pending = channel.pending()
        if not pending:
            return f"no job waits for the review of {site_name}'s data owner"
        lines = [f"{len(pending)} job(s) wait for review (show one with action=show job=<hash>):"]
        return "\n".join(lines + [f"  {job.job_hash[:16]}  {job.summary()}" for job in pending])
    job = _pending_job(channel, cfg.job)
    if action == "show":
        return f"{job.render()}\n\n{_code_note(job)}\nDecide with action=approve or action=reject job={job.job_hash[:16]}"
    if action not in DECISIONS:
        raise ValueError(f"action must be list, show, approve or reject, not {action!r}")
    record = channel.answer(work_dir, job.job_hash, DECISIONS[action], f"data owner of {site_name}")
    return f"{site_name}: {record.decision} of job {job.job_hash} signed with the site's key and sent"
