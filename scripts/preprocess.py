"""Preprocess sites into their identifier-free training caches.

For hospital IT or data teams at a site. Required: +site=<your site file> (or data.sites_root and data.sites for folders in the demo layout).

    python scripts/preprocess.py                                 # every data.sites under data.sites_root
    python scripts/preprocess.py data.sites=[site2]              # one demo site
    python scripts/preprocess.py +site=demo_site1                # a site described by conf/site/*.yaml
    python scripts/preprocess.py data.image_size=128 preprocess.workers=1

Unchanged files are skipped; each site's report.csv lists every file with its status.
"""

from __future__ import annotations

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.governance.revocation import preprocess_sites  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors(bool(cfg.verbose)):
        preprocess_sites(cfg)  # logs each site's summary


if __name__ == "__main__":
    main()
