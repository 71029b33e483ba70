"""Run a federation of simulated hospital sites on this machine.

    python scripts/simulate.py experiment=demo                # the embedded demo, 3 sites
    python scripts/simulate.py experiment=pneumonia_primia    # the study preset
    python scripts/simulate.py federation.num_rounds=10 data.sites=[site1,site2]

Steps: build the demo sites if asked (``data.prepare_demo``), preprocess every site
(unchanged files are skipped), federate with Flower, then evaluate the final global model
on the sites' held-out test patients.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.federation.simulation import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run(cfg, Path(cfg.output_dir))


if __name__ == "__main__":
    main()
