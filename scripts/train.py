"""Centralised and single-site baselines, trained like the federation (same epochs in total).

For ML engineers comparing against the federation. Required: mode=centralised or mode=local local_site=<site>.

    python scripts/train.py experiment=demo mode=centralised               # pool every site
    python scripts/train.py experiment=demo mode=local local_site=site1    # one site alone
    python scripts/train.py mode=centralised trainer.max_epochs=20 model=densenet121

Every baseline is scored on the test patients of all ``data.sites``, like the federated
model, so the three can be compared. Writes ``model.pt``, ``metrics.json``,
``confusion_matrix.png``, ``roc.png``, Lightning logs and a Lightning checkpoint into
``output_dir``. The sites must be preprocessed (``scripts/preprocess.py``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.evaluation.baseline import run_baseline  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with one_line_errors(bool(cfg.verbose)):
        return run_baseline(cfg, Path(cfg.output_dir))["pneumonia_auroc"]


if __name__ == "__main__":
    main()
