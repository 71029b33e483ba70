"""Site: preprocess this hospital's data if needed, then join the federation.

For hospital IT, on the site's machine. Required: the site file (--config-dir <folder> +site=<name> reads <folder>/site/<name>.yaml) and the coordinator's experiment=.

    python scripts/site.py --config-dir /etc/fedrad +site=hospital_a experiment=pneumonia_primia
    python scripts/site.py +site=demo_site1 experiment=demo            # a demo site (conf/site/)

The site file, kept outside the repository, names the site's data folders, work folder, the
coordinator's address, the federation CA, the site's own key, its standing privacy budget and
its approval policy. The site dials out (set HTTPS_PROXY for an outbound proxy), reconnects on
its own after failures, and exits 0 when the federation is finished. Only model updates and
scalar metrics leave the site.
"""

from __future__ import annotations

from pipeline.cli import answer_help

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.deployment.site import run_site  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_site(cfg)


if __name__ == "__main__":
    main()
