"""A site's data owner reviews the training jobs proposed to the site: approves, rejects, withdraws.

For a site's data owner. Required: +site=<your site file>; action=show|approve|reject|withdraw job=<hash or prefix> to decide.

    python scripts/review_job.py +site=demo_site1                                # pending and decided jobs
    python scripts/review_job.py +site=demo_site1 action=show job=3f2a9c1d       # read one
    python scripts/review_job.py +site=demo_site1 action=approve job=3f2a9c1d    # or action=reject
    python scripts/review_job.py +site=demo_site1 action=withdraw job=3f2a9c1d   # withdraw an approval

The site trains only in a job whose exact hash its data owner approved: each decision is signed
with the site's key, entered in the site's ledger (the latest decision there counts), kept in
<work dir>/approvals/ and sent back to the coordinator. An approval can be withdrawn at any time
(action=withdraw, or action=reject on an approved job); from then on the site refuses the job
until its data owner approves it again with action=approve. Requests arrive through
job_requests=folder (default) or job_requests=syft. Errors (a bad key file, a ledger that does
not verify, an unknown job) are printed as one line, with exit status 2.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.deployment.site import configured_site  # noqa: E402
from pipeline.governance.review import review  # noqa: E402
from pipeline.governance.site_ledger import LedgerCorrupted  # noqa: E402


# KeyFileError is a ValueError; JobNotApproved a PermissionError (an OSError).
@hydra.main(config_path="../conf", config_name="job_review", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors(False, LedgerCorrupted):
        site = configured_site(cfg)
        print(review(cfg, site.name, Path(site.work_dir)))


if __name__ == "__main__":
    main()
