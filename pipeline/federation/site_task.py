"""What a site does in a round, with no Flower types: train or evaluate on its own cache.

The ClientApp only unpacks Flower messages, calls these functions and packs the reply, so
the same code trains centrally, locally and federated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.datamodule import CacheDataModule
from pipeline.training import build_classifier, build_trainer, evaluate, train

StateDict = dict[str, torch.Tensor]


def round_seed(cfg: DictConfig, server_round: int) -> int:
    """Seed of a round's local training: differs per round, reproducible per run."""
    return int(cfg.seed) + 1000 * server_round


def train_site(
    cfg: DictConfig, cache_dir: Path, global_state: StateDict, server_round: int
) -> tuple[StateDict, dict[str, float]]:
    """Train the global model for ``federation.local_epochs`` on one site's train split.

    Returns the updated state dict and scalar metrics including ``num-examples``.
    """
    seed = round_seed(cfg, server_round)
    classifier = build_classifier(cfg, seed=seed)
    classifier.net.load_state_dict(global_state)
    datamodule = CacheDataModule.from_config(cfg.data, [cache_dir], seed=seed)
    trainer = build_trainer(cfg, max_epochs=int(cfg.federation.local_epochs), lean=True)
    metrics = train(classifier, datamodule, trainer)
    state = {k: v.detach().cpu() for k, v in classifier.net.state_dict().items()}
    return state, metrics


def evaluate_site(
    cfg: DictConfig, cache_dir: Path, global_state: StateDict, split: str = "val"
) -> dict[str, float]:
    """Evaluate the global model on one split of one site; scalar metrics only."""
    classifier = build_classifier(cfg, seed=int(cfg.seed))
    classifier.net.load_state_dict(global_state)
    datamodule = CacheDataModule.from_config(cfg.data, [cache_dir], seed=int(cfg.seed))
    trainer = build_trainer(cfg, max_epochs=1, lean=True)
    return evaluate(classifier, datamodule, split, trainer)
