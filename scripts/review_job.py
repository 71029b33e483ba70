"""A site's data owner reviews the training jobs proposed to the site, and approves or rejects them.

    python scripts/review_job.py +site=demo_site1                                # pending jobs
    python scripts/review_job.py +site=demo_site1 action=show job=3f2a9c1d       # read one
    python scripts/review_job.py +site=demo_site1 action=approve job=3f2a9c1d    # or action=reject

The site trains only in a job whose exact hash its data owner approved: the decision is signed
with the site's key, kept in <work dir>/approvals/, entered in the site's ledger and sent back
to the coordinator. Requests arrive through job_requests=folder (default) or job_requests=syft.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.deployment.site import configured_site
from pipeline.governance.review import review


@hydra.main(config_path="../conf", config_name="job_review", version_base="1.3")
def main(cfg: DictConfig) -> None:
    site = configured_site(cfg)
    print(review(cfg, site.name, Path(site.work_dir)))


if __name__ == "__main__":
    main()
