"""Job requests and decisions through syft datasites (``syft`` 0.10, ``syft-rds``).

The coordinator (a syft data scientist) submits a job to a site's datasite as a syft job whose
``code/`` holds the job (``fedrad_job.json``) and its readable text (``fedrad_job.txt``); it is
a request to review, never code to run (its entry point only says so). The site's data owner
lists pending requests, reviews one, and approves or rejects it: the site signs the decision
with its own key (:func:`pipeline.governance.approval.decide`) and the syft job's review
reason carries the signed decision back to the coordinator.

Clients come from :func:`syft_rds.login_ds` / :func:`syft_rds.login_do` (Google Drive) or,
offline, from ``SyftRDSClient.pair_with_mock_drive_service_connection`` (syft's in-memory
Drive mock, used by the tests).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from syft_rds.client import SyftRDSClient

from pipeline.governance.approval import Decision, JobDecision, decide
from pipeline.governance.job import Job

log = logging.getLogger("fedrad.governance")

JOB_FILE = "fedrad_job.json"
READABLE_FILE = "fedrad_job.txt"
ENTRYPOINT = "review_only.py"
ENTRYPOINT_TEXT = (
    'raise SystemExit("fedrad training job request: for review and approval with '
    'scripts/review_job.py, not for execution")\n'
)


def request_name(job_hash: str) -> str:
    """The syft job name of a fedrad job request."""
    return f"fedrad-{job_hash[:16]}"


@contextlib.contextmanager
def _quiet():
    """syft prints progress banners to stdout; keep them out of fedrad's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class SyftChannel:
    """Job requests to, and decisions from, one site's datasite (``site_email``)."""

    def __init__(self, client: SyftRDSClient, site_email: str) -> None:
        self.client = client
        self.site_email = site_email

    def _syft_jobs(self) -> list:
        """Every fedrad request in the site's datasite, as this client sees it after a sync."""
        with _quiet():
            jobs = list(self.client.jobs)
        return [
            job
            for job in jobs
            if job.datasite_owner_email == self.site_email and job.name.startswith("fedrad-")
        ]

    def _syft_job(self, job_hash: str):
        matches = [job for job in self._syft_jobs() if job.name == request_name(job_hash)]
        if not matches:
            raise LookupError(f"no request for job {job_hash} in the datasite of {self.site_email}")
        return matches[0]

    def submit(self, job: Job) -> None:
        """Coordinator: submit ``job`` to the site for review."""
        with tempfile.TemporaryDirectory() as folder:
            code = Path(folder)
            (code / JOB_FILE).write_text(job.to_json())
            (code / READABLE_FILE).write_text(job.render())
            (code / ENTRYPOINT).write_text(ENTRYPOINT_TEXT)
            with _quiet():
                self.client.submit_python_job(
                    self.site_email,
                    str(code),
                    job_name=request_name(job.job_hash),
                    entrypoint=ENTRYPOINT,
                    force_submission=True,
                )
        log.info("job %s submitted to %s for review", job.job_hash, self.site_email)

    @staticmethod
    def _job_of(syft_job) -> Job | None:
        """The fedrad job a request holds, if its name matches its content."""
        path = Path(syft_job.code_dir) / JOB_FILE
        job = Job.from_json(path.read_text()) if path.is_file() else None
        if job is None or request_name(job.job_hash) != syft_job.name:
            log.warning("ignoring syft job %r: not a well-formed fedrad job request", syft_job.name)
            return None
        return job

    def pending(self) -> list[Job]:
        """Site: the requests waiting for the data owner's decision."""
        pending = (job for job in self._syft_jobs() if job.status == "pending")
        return [job for job in map(self._job_of, pending) if job is not None]

    def answer(self, work_dir: Path, job_hash: str, decision: Decision, decided_by: str) -> JobDecision:
        """Site: sign the data owner's decision on a pending request and send it back."""
        syft_job = self._syft_job(job_hash)
        job = self._job_of(syft_job)
        if job is None or syft_job.status != "pending":
            raise LookupError(f"job {job_hash} is not a pending request (status {syft_job.status})")
        record = decide(work_dir, job, decision, decided_by)
        with _quiet():
            if decision == "approval":
                syft_job.approve(reason=record.to_json())
            else:
                syft_job.reject(reason=record.to_json())
            self.client.sync()
        return record

    def decision(self, job_hash: str) -> JobDecision | None:
        """Coordinator: the site's signed decision on ``job_hash``; ``None`` while pending."""
        syft_job = self._syft_job(job_hash)
        if syft_job.status not in ("approved", "rejected") or not syft_job.review_reason:
            return None
        return JobDecision.from_json(syft_job.review_reason)
