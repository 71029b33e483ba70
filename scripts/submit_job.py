"""The coordinator proposes a training job to every site's data owner, and reads their decisions.

For the coordinator's operator. Required: the job's overrides (e.g. experiment=demo); action=status to see the sites' decisions.

    python scripts/submit_job.py experiment=pneumonia_primia                  # submit the job
    python scripts/submit_job.py experiment=pneumonia_primia action=status    # who approved it

The job is the experiment config the sites would receive, the fedrad version, the code hash,
the rounds and the privacy budget; any change to them (more rounds, a bigger budget, other
code) makes another job that needs a new approval. Pass the same overrides as to the run.
"""

from __future__ import annotations

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.governance.review import job_status, submit_job  # noqa: E402


@hydra.main(config_path="../conf", config_name="job_review", version_base="1.3")
def main(cfg: DictConfig) -> None:
    action = cfg.action or "submit"
    with one_line_errors():
        if action not in ("submit", "status"):
            raise ValueError(f"action must be submit or status, not {action!r}")
        print(submit_job(cfg) if action == "submit" else job_status(cfg))


if __name__ == "__main__":
    main()
