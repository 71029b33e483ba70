"""Run a federation of simulated hospital sites on this machine.

For ML engineers on one machine. Required: nothing (experiment=demo runs the demo); data.sites_root and data.sites name other sites.

    python scripts/simulate.py experiment=demo                # the embedded demo, 3 sites
    python scripts/simulate.py experiment=pneumonia_primia    # the study preset
    python scripts/simulate.py federation.num_rounds=10 data.sites=[site1,site2]
    python scripts/simulate.py -m hparams_search=demo_optuna experiment=demo   # Optuna search

Steps: build the demo sites if asked (``data.prepare_demo``), preprocess every site
(unchanged files are skipped), federate with Flower, then evaluate the final global model
on the sites' held-out test patients. Returns that test ROC-AUC (pneumonia vs normal) or, when
``optimized_metric`` is set (hyper-parameter search), the last round's validation metric of
that name, which the search maximises.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.federation.objective import validation_metric  # noqa: E402
from pipeline.federation.simulation import NoModelReleased, run  # noqa: E402
from pipeline.support.demo_sites import prepare_demo_sites  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    output_dir = Path(cfg.output_dir)
    with one_line_errors(bool(cfg.verbose), NoModelReleased):
        if cfg.data.get("prepare_demo"):
            prepare_demo_sites(cfg.data.sites_root, n_sites=len(cfg.data.sites))
        test_auroc = run(cfg, output_dir)
        metric = cfg.get("optimized_metric")
        return validation_metric(output_dir, metric) if metric else test_auroc


if __name__ == "__main__":
    main()
