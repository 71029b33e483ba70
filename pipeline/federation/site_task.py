"""What a site does in a round, with no Flower types: train or evaluate on its own cache.

The ClientApp only unpacks Flower messages, calls these functions and packs the reply, so
the same code trains centrally, locally and federated, with or without secure aggregation.
Every trained round is a signed ``round`` entry of the site's ledger
(:mod:`pipeline.governance.rounds`); with ``privacy.enabled`` the round is DP-SGD, its noise and
batch sampling are drawn from a fresh cryptographically secure source at the site
(:mod:`pipeline.privacy.randomness`), and the entry is charged to the site's privacy budget.

A round is released once (:mod:`pipeline.federation.releases`): the same request again gets the
same update back, uncharged; anything else under the same ``run:round`` is a new training that
the site's policy refuses or charges in full.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.contracts.layout import WorkDir
from pipeline.contracts.messages import NUM_EXAMPLES
from pipeline.evaluation.threshold import grid_counts, pneumonia_score
from pipeline.federation.releases import MASKING_NEIGHBOURS, Release, ReleaseRefused, ReleaseStore
from pipeline.federation.site_policy import SitePolicy
from pipeline.governance.approval import enforce_approval
from pipeline.governance.budget import PrivacyLedger
from pipeline.governance.revocation import revoked_patients
from pipeline.governance.rounds import (
    TrainedRound,
    evaluation_head,
    experiment_sha256,
    round_key,
    round_lock,
    state_sha256,
    trained_patients,
    verified_entries,
)
from pipeline.privacy.dp import DPSettings, PoissonDataModule, PrivateTraining, plan_round
from pipeline.privacy.randomness import fresh_seed, noise_source
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import (
    build_classifier,
    build_trainer,
    evaluate,
    lr_factor,
    predict_probabilities,
    train,
)

StateDict = dict[str, torch.Tensor]


def round_seed(cfg: DictConfig, server_round: int) -> int:
    """Seed of a non-private round's local training: differs per round, reproducible per run."""
    return int(cfg.seed) + 1000 * server_round


def _replay(store: ReleaseStore, release: Release, work_dir: Path) -> tuple[StateDict, dict[str, float]]:
    """The update already released for this request, checked against the signed ledger."""
    neighbours = MASKING_NEIGHBOURS.get()
    if neighbours is not None:
        store.masked_against(release.run, release.round, neighbours)
    revoked = revoked_patients(work_dir) & set(
        trained_patients(work_dir).get(round_key(release.run, release.round), [])
    )
    if revoked:
        raise ReleaseRefused(
            f"round {release.round} of run {release.run} trained on {len(revoked)} patients whose "
            "consent has since been revoked: this site does not send that update again"
        )
    signed = {e["body"].get("update_sha256") for e in verified_entries(work_dir) if e["kind"] == "round"}
    update = store.update(release)
    if release.update_sha256 not in signed or state_sha256(update) != release.update_sha256:
        raise ReleaseRefused(
            f"the stored update of round {release.round} of run {release.run} does "
            "not match the site's signed ledger: it is not sent again"
        )
    return update, dict(release.metrics) | {NUM_EXAMPLES: release.num_examples}


def train_site(
    cfg: DictConfig,
    cache_dir: Path,
    global_state: StateDict,
    server_round: int,
    run_id: str = "local",
    policy: SitePolicy | None = None,
) -> tuple[StateDict, dict[str, float]]:
    """Train the global model for ``federation.local_epochs`` on one site's train split.

    Returns the updated state dict and scalar metrics including ``num-examples`` (and, under
    DP-SGD, the site's cumulative ``epsilon`` at its ``delta``). Under DP-SGD, raises
    :class:`pipeline.governance.budget.PrivacyBudgetExhausted` instead of exceeding the budget.
    Before anything else, raises :class:`pipeline.governance.approval.JobNotApproved` unless
    the site's data owner approved this job (``cfg.governance``); then, holding the site's round
    lock, raises :class:`pipeline.governance.site_ledger.LedgerCorrupted` unless the site's ledger
    verifies, and :class:`pipeline.federation.releases.ReleaseRefused` for a ``run:round`` it
    will not release again.
    """
    work = WorkDir.of_cache(cache_dir)
    work_dir = work.root
    policy = policy or SitePolicy()
    enforce_approval(cfg, work_dir)
    with round_lock(work_dir):
        verified_entries(work_dir)
        store = ReleaseStore(work)
        config_sha, global_sha = experiment_sha256(cfg), state_sha256(global_state)
        secure = MASKING_NEIGHBOURS.get() is not None
        previous = store.find(run_id, server_round)
        if previous is not None and previous.same_request(config_sha, global_sha, secure):
            return _replay(store, previous, work_dir)
        if previous is not None and policy.retrain_round == "refuse":
            raise ReleaseRefused(
                f"this site already released round {server_round} of run {run_id} "
                f"(from global model {previous.global_model_sha256[:12]}, "
                f"{'secure' if previous.secure_aggregation else 'plain'} aggregation) and is now "
                f"asked for it from {global_sha[:12]} ({'secure' if secure else 'plain'}): it does "
                "not train a round twice (site policy retrain_round=refuse)"
            )
        state, metrics = _train(cfg, cache_dir, global_state, server_round, run_id, policy)
        num_examples = int(metrics[NUM_EXAMPLES])
        release = Release(
            run=run_id,
            round=server_round,
            config_sha256=config_sha,
            global_model_sha256=global_sha,
            update_sha256=state_sha256(state),
            num_examples=num_examples,
            metrics={k: float(v) for k, v in metrics.items() if k != NUM_EXAMPLES},
            secure_aggregation=secure,
            neighbours=MASKING_NEIGHBOURS.get(),
        )
        store.save(release, state)
    return state, metrics


def _train(
    cfg: DictConfig,
    cache_dir: Path,
    global_state: StateDict,
    server_round: int,
    run_id: str,
    policy: SitePolicy,
) -> tuple[StateDict, dict[str, float]]:
    """One fresh local training, recorded (and, under DP, charged) in the signed ledger."""
    trained = TrainedRound.start(cfg, cache_dir, global_state, server_round, run_id)
    private = bool(cfg.get("privacy", {}).get("enabled"))
    seeded = private and bool(cfg.privacy.get("debug_seeded_noise", False))
    seed = round_seed(cfg, server_round) if not private or seeded else fresh_seed()
    datamodule = CacheDataModule.from_config(cfg.data, [cache_dir], seed=seed)
    classifier = build_classifier(
        cfg,
        seed=seed,
        load_pretrained=False,
        train_labels=datamodule.dataset("train").labels,
        lr_factor=lr_factor(cfg.federation, server_round),
    )
    classifier.net.load_state_dict(global_state)
    mu = float(cfg.federation.get("proximal_mu", 0.0))
    if mu > 0:
        classifier.proximal = (mu, {k: v.detach().clone() for k, v in classifier.net.named_parameters()})
    label = f"site {WorkDir(trained.work_dir).site_name} round {server_round}"
    trainer = build_trainer(cfg, max_epochs=int(cfg.federation.local_epochs), lean=True, progress=label)
    privacy = None
    if not private:
        metrics = train(classifier, datamodule, trainer)
    else:
        settings = DPSettings.from_config(cfg.privacy)
        source = noise_source(seeded, policy.allow_seeded_noise, seed)
        plan = plan_round(
            settings,
            datamodule.num_train_examples,
            int(cfg.data.batch_size),
            int(cfg.federation.local_epochs),
            int(cfg.federation.num_rounds),
        )
        ledger = PrivacyLedger(trained.work_dir, settings.accountant)
        ledger.check_budget(server_round, plan, settings.epsilon_budget)
        views = settings.augmentation_multiplicity
        classifier.private = PrivateTraining(plan, settings.max_grad_norm, settings.accountant, source, views)
        metrics = train(classifier, PoissonDataModule(datamodule, source, views), trainer)
        privacy = ledger.charge(classifier.private.accountant.history, plan.delta)
        privacy["noise_source"] = source.name
        metrics |= {"epsilon": privacy["epsilon"], "delta": plan.delta}
    state = {k: v.detach().cpu() for k, v in classifier.net.state_dict().items()}
    trained.record(state, privacy)
    return state, metrics


def evaluate_site(
    cfg: DictConfig, cache_dir: Path, global_state: StateDict, split: str = "val"
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Evaluate the global model on one split of one site: scalar metrics, and the images with
    and without pneumonia it calls pneumonia at each threshold of a fixed grid
    (:func:`pipeline.evaluation.threshold.grid_counts`)."""
    classifier = build_classifier(cfg, seed=int(cfg.seed), load_pretrained=False)
    classifier.net.load_state_dict(global_state)
    datamodule = CacheDataModule.from_config(cfg.data, [cache_dir], seed=int(cfg.seed))
    trainer = build_trainer(cfg, max_epochs=1, lean=True)
    metrics = evaluate(classifier, datamodule, split, trainer)
    images = datamodule.dataset(split)
    score = pneumonia_score(predict_probabilities(classifier, images.images))
    return metrics, grid_counts(images.labels.numpy() != NORMAL_INDEX, score)


def evaluate_round(
    cfg: DictConfig, cache_dir: Path, global_state: StateDict, server_round: int, run_id: str
) -> tuple[dict[str, float], dict[str, str | int], dict[str, list[int]]]:
    """A federation's evaluation of ``run:round``: validation metrics, the ledger head and the
    validation threshold counts.

    Answered once per ``run:round``: the same model again gets the same answer; another model
    for a round the site already evaluated is refused, so that a coordinator cannot probe the
    validation split with many models under one round.
    """
    work = WorkDir.of_cache(cache_dir)
    work_dir = work.root
    enforce_approval(cfg, work_dir)
    store = ReleaseStore(work)
    model_sha = state_sha256(global_state)
    with round_lock(work_dir):
        answered = store.evaluation(run_id, server_round)
        if answered is not None:
            if answered["global_model_sha256"] != model_sha:
                raise ReleaseRefused(
                    f"this site already evaluated a model for round {server_round} of run {run_id} "
                    f"({answered['global_model_sha256'][:12]}); it does not score another one "
                    f"({model_sha[:12]}) for the same round"
                )
            return dict(answered["metrics"]), dict(answered["head"]), dict(answered.get("counts", {}))
        verified_entries(work_dir)
        metrics, counts = evaluate_site(cfg, cache_dir, global_state, split="val")
        head = evaluation_head(work_dir, run_id, server_round, global_state)
        store.save_evaluation(
            run_id,
            server_round,
            {"global_model_sha256": model_sha, "metrics": metrics, "head": head, "counts": counts},
        )
    return metrics, head, counts
