"""What a site does in a round, with no Flower types: train or evaluate on its own cache.

The ClientApp only unpacks Flower messages, calls these functions and packs the reply, so
the same code trains centrally, locally and federated, with or without secure aggregation.
Every trained round is a signed ``round`` entry of the site's ledger
(:mod:`pipeline.governance.rounds`); with ``privacy.enabled`` the round is DP-SGD, and that
entry is charged to the site's privacy budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.datamodule import CacheDataModule
from pipeline.governance.approval import enforce_approval
from pipeline.governance.rounds import TrainedRound
from pipeline.privacy.dp import DPSettings, PoissonDataModule, PrivateTraining, plan_round
from pipeline.privacy.ledger import PrivacyLedger
from pipeline.training import build_classifier, build_trainer, evaluate, train

StateDict = dict[str, torch.Tensor]


def round_seed(cfg: DictConfig, server_round: int) -> int:
    """Seed of a round's local training: differs per round, reproducible per run."""
    return int(cfg.seed) + 1000 * server_round


def train_site(
    cfg: DictConfig,
    cache_dir: Path,
    global_state: StateDict,
    server_round: int,
    run_id: str = "local",
) -> tuple[StateDict, dict[str, float]]:
    """Train the global model for ``federation.local_epochs`` on one site's train split.

    Returns the updated state dict and scalar metrics including ``num-examples`` (and, under
    DP-SGD, the site's cumulative ``epsilon`` at its ``delta``). Under DP-SGD, raises
    :class:`pipeline.privacy.ledger.PrivacyBudgetExhausted` instead of exceeding the budget.
    Before anything else, raises :class:`pipeline.governance.approval.JobNotApproved` unless
    the site's data owner approved this job (``cfg.governance``).
    """
    enforce_approval(cfg, cache_dir.parent)
    trained = TrainedRound.start(cfg, cache_dir, global_state, server_round, run_id)
    seed = round_seed(cfg, server_round)
    classifier = build_classifier(cfg, seed=seed)
    classifier.net.load_state_dict(global_state)
    datamodule = CacheDataModule.from_config(cfg.data, [cache_dir], seed=seed)
    trainer = build_trainer(cfg, max_epochs=int(cfg.federation.local_epochs), lean=True)
    ledger, privacy = None, None
    if not cfg.get("privacy", {}).get("enabled"):
        metrics = train(classifier, datamodule, trainer)
    else:
        settings = DPSettings.from_config(cfg.privacy)
        plan = plan_round(
            settings, datamodule.num_train_examples, int(cfg.data.batch_size),
            int(cfg.federation.local_epochs), int(cfg.federation.num_rounds),
        )
        ledger = PrivacyLedger.for_cache(cache_dir, settings.accountant)
        ledger.check_budget(run_id, server_round, plan, settings.epsilon_budget)
        classifier.private = PrivateTraining(plan, settings.max_grad_norm, settings.accountant)
        metrics = train(classifier, PoissonDataModule(datamodule), trainer)
        history = classifier.private.accountant.history
        privacy = ledger.charge(run_id, server_round, history, plan.delta)
        metrics |= {"epsilon": privacy["epsilon"], "delta": plan.delta}
    state = {k: v.detach().cpu() for k, v in classifier.net.state_dict().items()}
    entry = trained.record(state, privacy)
    if ledger is not None:
        ledger.record(entry)
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
