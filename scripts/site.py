"""Site: preprocess this hospital's data if needed, then join the federation.

For hospital IT, on the site's machine. Required: +site=<your site file> and deployment.superlink=<coordinator:port>.

    python scripts/site.py +site=demo_site1 experiment=demo deployment.superlink=coordinator.example.org:9092

conf/site/<name>.yaml names the site's DICOM folder, labels and work folder; the site needs
the federation's ca.crt and its own private key (deployment.root_certificate,
deployment.private_key). Only model updates and scalar metrics leave the site.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.cli import answer_help

answer_help(__doc__)  # before the training stack is imported

from pipeline.deployment.site import run_site  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_site(cfg)


if __name__ == "__main__":
    main()
