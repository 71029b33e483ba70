"""Coordinator: start Flower's SuperLink and run one experiment over the connected sites.

    python scripts/coordinator.py experiment=demo output_dir=outputs/federation/demo
    python scripts/coordinator.py experiment=demo deployment.listen_host=0.0.0.0 deployment.port=9092

TLS and SuperNode authentication are on (run scripts/make_certs.py first); the SuperLink
database lives in deployment.state_dir. Restarting with the same output_dir after a crash
continues from the last completed round. deployment.insecure=true runs plain text (test only).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.deployment.coordinator import run_coordinator


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    status = run_coordinator(cfg)
    if status != "finished:completed":
        raise SystemExit(f"the federation run ended with status {status}")


if __name__ == "__main__":
    main()
