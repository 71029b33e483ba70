"""Pretraining on public data the coordinator holds, to start a federation (or DP-SGD) warm.

The public set is any folder of labelled images, preprocessed exactly as a site's are
(:func:`pipeline.ingestion.preprocess.preprocess_site`: its own cache, secret and report under
``pretrain.work_dir``), then trained on centrally for ``pretrain.epochs`` with the configured
model, optimiser and class balancing, starting from ``model.weights_path`` when set (for
example ImageNet weights a hospital holds; their first RGB convolution is summed to one
channel). The weights are written as a fedrad checkpoint that ``model.weights_path`` takes.

Public means public: a patient in the public set must not be in any site's data, or their
images are trained on without DP. Split by patient.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.contracts.layout import SitePaths
from pipeline.ingestion.preprocess import preprocess_site
from pipeline.training.checkpoints import save_checkpoint
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import build_classifier, build_trainer, evaluate, train

log = logging.getLogger("fedrad.pretrain")


def public_site(pretrain: DictConfig) -> SitePaths:
    """The public set laid out as a site (``pretrain.input_dir``, ``labels_csv``, ``work_dir``)."""
    missing = [key for key in ("input_dir", "labels_csv") if not pretrain.get(key)]
    if missing:
        raise ValueError(
            f"set pretrain.{missing[0]}: the public images to pretrain on and their "
            "labels.csv (file,label[,patient_id])"
        )
    return SitePaths.public_set(pretrain.input_dir, pretrain.labels_csv, pretrain.work_dir)


def pretrain(cfg: DictConfig) -> tuple[Path, dict[str, float]]:
    """Preprocess and train on the public set; returns the weights file and validation metrics."""
    site = public_site(cfg.pretrain)
    preprocess_site(site, cfg.preprocess, revoked=())  # public data: no consent to withdraw
    datamodule = CacheDataModule.from_config(cfg.data, [site.cache(cfg.data.image_size)], seed=int(cfg.seed))
    classifier = build_classifier(cfg, train_labels=datamodule.dataset("train").labels)
    epochs = int(cfg.pretrain.epochs)
    log.info(
        "pretraining %s on %d public images for %d epochs",
        cfg.model.net._target_.rsplit(".", 1)[-1],
        datamodule.num_train_examples,
        epochs,
    )
    train(classifier, datamodule, build_trainer(cfg, max_epochs=epochs, lean=True))
    metrics: dict[str, float] = {}
    if datamodule.has_split("val"):
        metrics = evaluate(classifier, datamodule, "val", build_trainer(cfg, max_epochs=1, lean=True))
    output = Path(cfg.pretrain.output)
    save_checkpoint(output, classifier.net.state_dict(), cfg, extra={"pretrained_on": "public"})
    return output, metrics
