"""Centralised and single-site baselines, trained like the federation (same epochs in total).

    python scripts/train.py mode=centralised                  # pool every site in data.sites
    python scripts/train.py mode=local local_site=site1       # one site alone
    python scripts/train.py mode=centralised trainer.max_epochs=20 model=densenet121

Writes ``model.pt``, ``metrics.json`` (test split), ``confusion_matrix.png``, ``roc.png``,
Lightning logs and a Lightning checkpoint into ``output_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.checkpoints import save_checkpoint
from pipeline.datamodule import CacheDataModule
from pipeline.evaluation import evaluate_checkpoint, summary_line
from pipeline.sites import SitePaths
from pipeline.training import build_classifier, build_trainer, train

log = logging.getLogger("fedrad.train")


def training_sites(cfg: DictConfig) -> list[str]:
    """The sites whose caches this run trains on, from ``mode`` and ``local_site``."""
    if cfg.mode == "centralised":
        return list(cfg.data.sites)
    if cfg.mode == "local":
        if not cfg.local_site:
            raise ValueError("mode=local needs the site to train on, e.g. local_site=site1")
        return [str(cfg.local_site)]
    raise ValueError(
        f"scripts/train.py runs mode=centralised or mode=local, not mode={cfg.mode}; "
        "federated training runs with scripts/simulate.py"
    )


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    sites = training_sites(cfg)
    cache_dirs = [SitePaths.under(cfg.data.sites_root, name).cache_dir for name in sites]
    epochs = int(cfg.trainer.max_epochs or cfg.federation.num_rounds * cfg.federation.local_epochs)
    output_dir = Path(cfg.output_dir)
    log.info("mode=%s  sites=%s  epochs=%d  output=%s", cfg.mode, ",".join(sites), epochs, output_dir)

    classifier = build_classifier(cfg)
    datamodule = CacheDataModule.from_config(cfg.data, cache_dirs, seed=int(cfg.seed))
    trainer = build_trainer(cfg, max_epochs=epochs, output_dir=output_dir)
    train_metrics = train(classifier, datamodule, trainer)
    checkpoint = save_checkpoint(
        output_dir / "model.pt", classifier.net, cfg,
        extra={"mode": str(cfg.mode), "sites": sites, "epochs": epochs},
    )
    log.info("trained on %d images: %s", train_metrics["num-examples"], train_metrics)

    metrics = evaluate_checkpoint(checkpoint, cache_dirs, output_dir, split="test")
    print(f"test ({', '.join(sites)}): {summary_line(metrics)}")
    print(f"model, metrics and plots in {output_dir}")
    return metrics["auroc"]


if __name__ == "__main__":
    main()
