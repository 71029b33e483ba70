"""Build, train and evaluate a classifier: the functions every mode shares.

Centralised and single-site baselines (``scripts/train.py``) and the federated site
(:mod:`pipeline.federation.site_task`) all go through these.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from models.registry import build_network, build_optimizer
from models.weights import load_weights
from pipeline.contracts.console import quiet_third_party
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.contracts.layout import RunLayout
from pipeline.contracts.messages import NUM_EXAMPLES
from pipeline.training.classifier import XrayClassifier, balanced_class_weights
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.progress import TrainingProgress

NEVER = 2**31 - 1  # an epoch interval no run reaches


def build_classifier(
    cfg: DictConfig,
    seed: int | None = None,
    load_pretrained: bool = True,
    train_labels: np.ndarray | torch.Tensor | None = None,
    lr_factor: float = 1.0,
) -> XrayClassifier:
    """Seed everything (``seed``, else ``cfg.seed``), then build ``cfg.model`` from the
    allow-list of :mod:`models.registry`.

    Loads ``cfg.model.weights_path`` when set and ``load_pretrained`` (``cfg.model.weights_strict``,
    default true); a federated site passes ``load_pretrained=False``: it starts from the global
    model it received and never opens a path named in a received config. Freezes the parameters
    whose names start with a prefix in ``cfg.model.freeze``. With ``cfg.model.class_balance`` and
    the ``train_labels`` it trains on, weights each class's loss by its inverse frequency.
    ``lr_factor`` scales the optimiser's learning rate (a round's schedule, see :func:`lr_factor`).
    """
    pl.seed_everything(int(cfg.seed if seed is None else seed), workers=True, verbose=False)
    model = cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True))
    net = build_network(model["net"])
    if load_pretrained and model.get("weights_path"):
        load_weights(net, model["weights_path"], strict=bool(model.get("weights_strict", True)))
    frozen = tuple(model.get("freeze") or ())
    for name, param in net.named_parameters():
        param.requires_grad_(not name.startswith(frozen) if frozen else True)
    optimizer = build_optimizer(model["optimizer"])
    if lr_factor != 1.0:
        optimizer = partial(
            optimizer.func, **{**optimizer.keywords, "lr": optimizer.keywords["lr"] * lr_factor}
        )
    weights = None
    if model.get("class_balance") and train_labels is not None:
        weights = balanced_class_weights(torch.as_tensor(train_labels), len(CLASS_NAMES))
    return XrayClassifier(net, optimizer, num_classes=len(CLASS_NAMES), class_weights=weights)


def lr_factor(federation: DictConfig, server_round: int) -> float:
    """The learning-rate factor of round ``server_round`` of ``federation.num_rounds``:
    ``constant`` (1), or ``cosine`` from 1 in round 1 to ``lr_final_factor`` in the last round."""
    schedule = str(federation.get("lr_schedule", "constant"))
    rounds = int(federation.num_rounds)
    if schedule == "constant" or rounds <= 1:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"federation.lr_schedule={schedule!r}: expected constant or cosine")
    final = float(federation.get("lr_final_factor", 0.1))
    progress = min(max(server_round - 1, 0), rounds - 1) / (rounds - 1)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_trainer(
    cfg: DictConfig,
    max_epochs: int,
    lean: bool = False,
    output_dir: str | Path | None = None,
    progress: str | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` for ``max_epochs`` epochs.

    ``lean=True`` (federated sites, benchmarks): no logger, checkpoint, progress bar,
    model summary or validation during fit. Otherwise, with ``output_dir``, a Lightning checkpoint of the last
    epoch (``lightning_checkpoints/``) and CSV + TensorBoard logs (``logs/``) go there.
    ``progress`` labels the progress lines of a long fit (:class:`TrainingProgress`, e.g. a site
    and its round). ``overrides`` are passed to ``pl.Trainer`` last.
    """
    options = cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True))
    options["max_epochs"] = max_epochs
    if lean:
        options.update(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            # No validation inside fit (the federation scores the global model itself);
            # trainer.validate() is not affected.
            check_val_every_n_epoch=NEVER,
        )
    elif output_dir is not None:
        run = RunLayout(Path(output_dir))
        options.update(
            default_root_dir=str(run.root),
            logger=[
                CSVLogger(save_dir=run.root, name=run.logs.name, version="csv"),
                TensorBoardLogger(save_dir=run.root, name=run.logs.name, version="tensorboard"),
            ],
            callbacks=[ModelCheckpoint(dirpath=run.lightning_checkpoints)],
        )
    else:
        options.update(logger=False, enable_checkpointing=False)
    if progress is not None:
        options["callbacks"] = [*options.get("callbacks", []), TrainingProgress(progress)]
    options.update(overrides)
    quiet_third_party(bool(cfg.get("verbose", False)))  # after Lightning set its own levels
    return pl.Trainer(**options)


def train(classifier: XrayClassifier, datamodule: CacheDataModule, trainer: pl.Trainer) -> dict[str, float]:
    """Fit; return the last epoch's ``train/`` metrics and ``num-examples``."""
    trainer.fit(classifier, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return metrics | {NUM_EXAMPLES: datamodule.num_train_examples}


def evaluate(
    classifier: XrayClassifier, datamodule: CacheDataModule, split: str, trainer: pl.Trainer
) -> dict[str, float]:
    """Score ``split`` ("val" or "test"): ``<split>/acc``, ``auroc``, ``mcc``,
    ``pneumonia_auroc``, ``loss`` and ``num-examples``."""
    run = {"val": trainer.validate, "test": trainer.test}
    if split not in run:
        raise ValueError(f"evaluate() scores the 'val' or 'test' split, not {split!r}")
    examples = len(datamodule.dataset(split))  # raises a clear error if the split is empty
    (metrics,) = run[split](classifier, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in metrics.items()} | {NUM_EXAMPLES: examples}


def predict_probabilities(
    classifier: XrayClassifier | torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """Softmax class probabilities (N, 3) of images (N, 1, H, W), in eval mode, no gradients."""
    net = classifier.net if isinstance(classifier, XrayClassifier) else classifier
    device = next(net.parameters()).device
    images = torch.as_tensor(images)
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        chunks = [
            net(images[i : i + batch_size].to(device)).softmax(dim=1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    net.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, len(CLASS_NAMES)), np.float32)
