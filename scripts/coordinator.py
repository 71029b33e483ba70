"""Coordinator: start Flower's SuperLink and run one experiment over the connected sites.

For the coordinator's operator. Required: experiment=<preset> or the overrides of the job the sites approved; output_dir=<folder>.

    python scripts/coordinator.py experiment=demo output_dir=outputs/federation/demo
    python scripts/coordinator.py experiment=demo deployment.listen_host=0.0.0.0 deployment.port=9092

TLS and SuperNode authentication are on (run scripts/make_certs.py first); the SuperLink
database lives in deployment.state_dir. Restarting with the same output_dir after a crash
continues from the last completed round; a failed SuperLink, executor or ServerApp is restarted
and the run resumed by itself (deployment.max_attempts). deployment.insecure=true runs plain text
(test only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli import answer_help

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.deployment.coordinator import run_coordinator  # noqa: E402

log = logging.getLogger("fedrad.deployment")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    outcome = run_coordinator(cfg)
    summary = outcome.summary(Path(cfg.output_dir))
    if not outcome.completed:
        raise SystemExit(summary)
    log.info("%s", summary)


if __name__ == "__main__":
    main()
