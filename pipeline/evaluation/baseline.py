"""Centralised and single-site baselines on the federation's own training path, released with an
operating threshold chosen on the training sites' validation images, as a federation's is."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.contracts.layout import RunLayout, SitePaths
from pipeline.contracts.messages import NUM_EXAMPLES
from pipeline.evaluation.scoring import evaluate_checkpoint, summary_line
from pipeline.evaluation.threshold import grid_counts, operating_threshold, pneumonia_score
from pipeline.training.checkpoints import OPERATING_THRESHOLD, save_checkpoint
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import build_classifier, build_trainer, predict_probabilities, train

log = logging.getLogger("fedrad.train")


def training_sites(cfg: DictConfig) -> list[str]:
    """The sites whose caches this run trains on, from ``mode`` and ``local_site``."""
    if cfg.mode == "centralised":
        return list(cfg.data.sites)
    if cfg.mode == "local":
        if not cfg.local_site:
            raise ValueError("mode=local needs the site to train on, e.g. local_site=site1")
        if cfg.local_site not in cfg.data.sites:
            raise ValueError(f"local_site={cfg.local_site} is not one of data.sites {list(cfg.data.sites)}")
        return [str(cfg.local_site)]
    raise ValueError(
        f"scripts/train.py runs mode=centralised or mode=local, not mode={cfg.mode}; "
        "federated training runs with scripts/simulate.py"
    )


def run_baseline(cfg: DictConfig, output_dir: Path) -> dict:
    """Train on the chosen sites for ``num_rounds x local_epochs`` epochs (or
    ``trainer.max_epochs``), then score on every site's test patients, as the federation is."""
    sites = training_sites(cfg)
    caches = {site.name: site.cache(cfg.data.image_size) for site in SitePaths.of_data(cfg.data)}
    epochs = int(cfg.trainer.max_epochs or cfg.federation.num_rounds * cfg.federation.local_epochs)
    log.info("mode=%s  sites=%s  epochs=%d  output=%s", cfg.mode, ",".join(sites), epochs, output_dir)

    datamodule = CacheDataModule.from_config(cfg.data, [caches[s] for s in sites], seed=int(cfg.seed))
    classifier = build_classifier(cfg, train_labels=datamodule.dataset("train").labels)
    trainer = build_trainer(cfg, max_epochs=epochs, output_dir=output_dir)
    train_metrics = train(classifier, datamodule, trainer)
    validation = datamodule.dataset("val")
    counts = grid_counts(
        validation.labels.numpy() != NORMAL_INDEX,
        pneumonia_score(predict_probabilities(classifier, validation.images)),
    )
    threshold = operating_threshold(counts, f"the validation images of {', '.join(sites)}")
    extra = {"mode": str(cfg.mode), "sites": sites, "epochs": epochs}
    if threshold is not None:
        extra[OPERATING_THRESHOLD] = threshold
    checkpoint = save_checkpoint(RunLayout(output_dir).model, classifier.net, cfg, extra=extra)
    log.info("trained on %d images: %s", train_metrics[NUM_EXAMPLES], train_metrics)
    metrics = evaluate_checkpoint(checkpoint, list(caches.values()), output_dir, split="test")
    log.info("test patients of %s: %s", ", ".join(caches), summary_line(metrics))
    log.info("model, metrics and plots in %s", output_dir)
    return metrics
