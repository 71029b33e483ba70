"""The whole audit of one model (and optionally a second one of the same data, e.g. its DP-SGD twin)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from models.registry import build_network
from pipeline.contracts.cache import SiteCache
from pipeline.contracts.layout import SitePaths, WorkDir
from pipeline.evaluation.audit.inversion import (
    DPUpdate,
    InversionSettings,
    chance_similarity,
    inversion_attack,
    resize,
)
from pipeline.evaluation.audit.membership import membership_audit, membership_data
from pipeline.evaluation.audit.release import ReleasePolicy, check_release, release_metrics
from pipeline.evaluation.audit.target import AuditTarget, load_target
from pipeline.evaluation.scoring import check_image_size
from pipeline.privacy.dp import DPSettings, plan_round

log = logging.getLogger("fedrad.audit")

SECURE_AGGREGATION_NOTE = (
    "Under secure aggregation (SecAgg+, federation.secure_aggregation=true) the coordinator never holds a "
    "single site's update: it learns only the sum over the sites of a round. The gradient inversion below "
    "shows what an adversary who does hold one site's update (a coordinator without secure aggregation, "
    "or anyone reading that site's traffic) could reconstruct from it."
)


def audit_output_dir(cfg: DictConfig) -> Path:
    """``audit.output_dir``, else an ``audit`` folder next to ``audit.checkpoint``."""
    return Path(cfg.audit.output_dir or Path(cfg.audit.checkpoint).parent / "audit")


NO_DP_SETTINGS = (
    "No update under DP-SGD was attacked: no audited model was trained with DP-SGD. Audit a DP-trained "
    "model beside it (audit.compare_checkpoint=...) or add privacy=dp_sgd to see what DP-SGD protects."
)


def dp_update(targets: list[AuditTarget], cfg: DictConfig, site_examples: int) -> DPUpdate | None:
    """The DP-SGD update settings of the first DP-trained model audited (else of ``cfg.privacy``),
    with the noise multiplier a site of ``site_examples`` training images uses; None without any."""
    configs = [t.config for t in targets if t.private] + ([cfg] if cfg.privacy.enabled else [])
    if not configs:
        return None
    config = configs[0]
    settings = DPSettings.from_config(config.privacy)
    plan = plan_round(
        settings,
        site_examples,
        int(config.data.batch_size),
        int(config.federation.local_epochs),
        int(config.federation.num_rounds),
    )
    return DPUpdate(plan.noise_multiplier, settings.max_grad_norm)


def inversion_section(
    cfg: DictConfig, targets: list[AuditTarget], caches: list[Path]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Attack one site's update without protection and under DP-SGD; scores and images."""
    options = cfg.audit.inversion
    site = SiteCache(caches[0]).load_split("train")
    count = int(options.batch_size)
    pixels = resize(torch.from_numpy(site.images.copy()), int(options.image_size))
    images, population = pixels[:count], pixels[count:]
    labels = torch.tensor(site.labels[:count])
    settings = InversionSettings(
        int(options.iterations), float(options.learning_rate), float(options.tv_weight), int(cfg.audit.seed)
    )
    dp = dp_update(targets, cfg, len(site.labels))
    results, shown = {}, {"original": images.numpy()}
    for protection in (None, dp) if dp is not None else (None,):
        torch.manual_seed(int(cfg.audit.seed))
        net_config = cast(dict[str, Any], OmegaConf.to_container(options.net, resolve=True))
        net = build_network(net_config, where="audit.inversion.net")
        name = "none" if protection is None else "dp-sgd"
        log.info("gradient inversion of a %d-image update, protection: %s", count, name)
        results[name], reconstructed = inversion_attack(net, images, labels, protection, settings)
        shown["no protection" if protection is None else f"DP-SGD (σ={protection.noise_multiplier:.2f})"] = (
            reconstructed.numpy()
        )
    section = {
        "network": OmegaConf.to_container(options.net, resolve=True),
        "site": WorkDir.of_cache(caches[0]).site_name,
        "image_size": int(options.image_size),
        "batch_size": count,
        "settings": vars(settings),
        "results": results,
        "chance": chance_similarity(images, population, settings.seed),
        "secure_aggregation": SECURE_AGGREGATION_NOTE,
        "dp_note": None if dp is not None else NO_DP_SETTINGS,
    }
    return section, shown


def run_audit(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every number of the audit of ``audit.checkpoint`` (and ``audit.compare_checkpoint``), and
    the images for the inversion figure."""
    checkpoints = [cfg.audit.checkpoint] + (
        [cfg.audit.compare_checkpoint] if cfg.audit.compare_checkpoint else []
    )
    if not checkpoints[0]:
        raise ValueError("name the model to audit: audit.checkpoint=<run folder>/model.pt")
    targets = [load_target(path, cfg) for path in checkpoints]
    caches = [site.cache(cfg.data.image_size) for site in SitePaths.of_data(cfg.data)]
    data = membership_data(caches)
    policy = ReleasePolicy.from_config(cfg.audit.release)
    inversion, images = inversion_section(cfg, targets, caches)
    models = []
    for target in targets:
        check_image_size(target.checkpoint, {"image_size": target.config.data.get("image_size")}, data.images)
        epochs = int(cfg.audit.membership.shadow_epochs or target.training_epochs)
        log.info(
            "membership inference on %s (%d members, %d non-members)",
            target.checkpoint,
            data.member.sum(),
            (~data.member).sum(),
        )
        membership = membership_audit(
            target.net,
            target.config,
            data,
            int(cfg.audit.membership.shadow_models),
            epochs,
            seed=int(cfg.audit.seed),
        )
        own = inversion["results"]["dp-sgd" if target.private else "none"]
        entry = {
            "name": target.name,
            **target.describe(),
            "membership": membership,
            "release_metrics": release_metrics(membership, own),
        }
        entry["release"] = {"violations": check_release(entry, policy)}
        models.append(entry)
    names = [m["name"] for m in models]
    for entry in models:  # two models of one description: tell them apart by their file's hash
        if names.count(entry["name"]) > 1:
            entry["name"] += f" ({entry['sha256'][:8]})"
    audit = {
        "title": "Privacy audit by attack",
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "sites": list(cfg.data.sites),
        "images_included": bool(cfg.audit.include_images),
        "policy": vars(policy),
        "models": models,
        "inversion": inversion,
    }
    return audit, images
