"""Job requests and decisions through a folder: the same exchange as the syft channel, no network.

The coordinator writes ``<folder>/<job hash>.json`` (the job) and ``<job hash>.txt`` (its
readable text) into a site's request folder; the site answers with the signed decision in
``<job hash>.decision.json``. How the folder travels (a share, a copy) is up to the sites; the
gate trusts only the site's own signature, never the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.governance.approval import Decision, JobDecision, decide
from pipeline.governance.job import Job

log = logging.getLogger("fedrad.governance")

DECISION_SUFFIX = ".decision.json"


class FolderChannel:
    """Job requests to, and decisions from, one site's request folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def submit(self, job: Job) -> None:
        """Coordinator: leave ``job`` in the site's request folder for review."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{job.job_hash}.txt").write_text(job.render() + "\n")
        (self.folder / f"{job.job_hash}.json").write_text(job.to_json())
        log.info("job %s submitted for review in %s", job.job_hash, self.folder)

    def _job(self, job_hash: str) -> Job:
        path = self.folder / f"{job_hash}.json"
        if not path.is_file():
            raise LookupError(f"no request for job {job_hash} in {self.folder}")
        job = Job.from_json(path.read_text())
        if job.job_hash != job_hash:
            raise LookupError(f"{path} holds job {job.job_hash}, not {job_hash}: it was altered")
        return job

    def pending(self) -> list[Job]:
        """Site: the requests without a decision yet."""
        if not self.folder.is_dir():
            return []
        hashes = sorted(
            path.stem for path in self.folder.glob("*.json") if not path.name.endswith(DECISION_SUFFIX)
        )
        return [self._job(h) for h in hashes if not (self.folder / f"{h}{DECISION_SUFFIX}").is_file()]

    def answer(self, work_dir: Path, job_hash: str, decision: Decision, decided_by: str) -> JobDecision:
        """Site: sign the data owner's decision on a request and leave it for the coordinator."""
        record = decide(work_dir, self._job(job_hash), decision, decided_by)
        (self.folder / f"{job_hash}{DECISION_SUFFIX}").write_text(record.to_json())
        return record

    def decision(self, job_hash: str) -> JobDecision | None:
        """Coordinator: the site's signed decision on ``job_hash``; ``None`` while pending."""
        path = self.folder / f"{job_hash}{DECISION_SUFFIX}"
        return JobDecision.from_json(path.read_text()) if path.is_file() else None
