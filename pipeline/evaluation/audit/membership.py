"""Membership inference: can an attacker tell the training patients from held-out ones?

Members are the images of the patients in the sites' ``train`` splits; non-members are the
images of the held-out patients (``val`` and ``test``). Splits are made by patient, so no
patient is on both sides. Two attacks score every image (higher = "member"):

* ``loss``: the negative cross-entropy of the image under the audited model (Yeom et al. 2018);
* ``lira``: offline LiRA (Carlini et al., *Membership Inference Attacks From First
  Principles*, IEEE S&P 2022). Shadow models are trained with the audited run's own
  training recipe on random halves of the pooled member and non-member images, so that each
  image is *outside* the training set of exactly half of them. The attack compares the
  audited model's logit-scaled confidence ``phi = log p_y - log(1 - p_y)`` with the mean of
  ``phi`` under the shadows that did not train on the image, with one variance shared by
  all images (the paper's choice with few shadows): score ``(phi - mu_out) / sigma_out``,
  the one-sided Gaussian likelihood test.

Metrics (scikit-learn): ROC-AUC, and the true-positive rate at a false-positive rate of
0.1% and 1%, read from the ROC curve as the highest TPR of a threshold whose FPR does not
exceed the target. With ``n`` non-members the FPR moves in steps of ``1 / n``; below that
the figure is the TPR at zero false positives (``fpr_resolution`` in the result).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from pipeline.contracts.cache import SplitArrays, load_splits
from pipeline.privacy.dp import DPSettings, PoissonDataModule, PrivateTraining, plan_round
from pipeline.privacy.randomness import SeededRandom
from pipeline.training.classifier import XrayClassifier
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import build_classifier, build_trainer, train

log = logging.getLogger("fedrad.audit")

TARGET_FPRS = (0.001, 0.01)
NON_MEMBER_SPLITS = ("val", "test")


@dataclass(frozen=True)
class MembershipData:
    """Candidate images (N, 1, H, W), labels, patient keys and whether each is a member."""

    images: np.ndarray
    labels: np.ndarray
    patient_keys: list[str]
    member: np.ndarray

    def subset(self, mask: np.ndarray) -> SplitArrays:
        """The images selected by ``mask`` as a training split."""
        keys = [k for k, keep in zip(self.patient_keys, mask) if keep]
        return SplitArrays(self.images[mask], self.labels[mask], keys)


def membership_data(cache_dirs: Sequence[str | Path]) -> MembershipData:
    """Members (``train`` patients) and non-members (``val`` + ``test`` patients) of the caches."""
    members = load_splits(list(cache_dirs), "train")
    held_out = [load_splits(list(cache_dirs), split) for split in NON_MEMBER_SPLITS]
    both = set(members.patient_keys) & {k for part in held_out for k in part.patient_keys}
    if both:
        raise ValueError(
            f"{len(both)} patient(s) are in both the train and the held-out splits of "
            f"{list(map(str, cache_dirs))}: "
            "membership is defined by patient, so preprocess the caches again (splits are made by patient)"
        )
    parts = [members, *held_out]
    return MembershipData(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        patient_keys=[k for p in parts for k in p.patient_keys],
        member=np.concatenate(
            [np.ones(len(members.labels), bool)] + [np.zeros(len(p.labels), bool) for p in held_out]
        ),
    )


def logits(net: nn.Module, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The network's logits (N, classes) in eval mode, without gradients."""
    device = next(net.parameters()).device
    tensors = torch.as_tensor(images)
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        out = torch.cat(
            [net(tensors[i : i + batch_size].to(device)).cpu() for i in range(0, len(tensors), batch_size)]
        )
    net.train(was_training)
    return out.double()


def loss_scores(net: nn.Module, data: MembershipData) -> np.ndarray:
    """Negative per-image cross-entropy: the loss-threshold attack's scores."""
    out = logits(net, data.images)
    return -torch.nn.functional.cross_entropy(out, torch.as_tensor(data.labels), reduction="none").numpy()


def scaled_confidence(net: nn.Module, data: MembershipData) -> np.ndarray:
    """``log p_y - log(1 - p_y)`` per image, computed stably from the logits."""
    out = logits(net, data.images)
    labels = torch.as_tensor(data.labels)
    true = out.gather(1, labels[:, None])[:, 0]
    others = out.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return (true - others).numpy()


def shadow_assignment(n_shadows: int, n_images: int, seed: int) -> np.ndarray:
    """(shadows, images) bool: which images train which shadow; each image trains exactly half."""
    if n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"audit.membership.shadow_models must be an even number >= 2, got {n_shadows}")
    order = np.random.default_rng(seed).random((n_shadows, n_images)).argsort(0)
    return order < n_shadows // 2


class ArraysDataModule(CacheDataModule):
    """A :class:`CacheDataModule` whose training split is given in memory (a shadow model's half)."""

    def __init__(self, train_split: SplitArrays, **kwargs: Any) -> None:
        super().__init__(cache_dirs=[Path("<in memory>")], **kwargs)
        self.train_split = train_split

    def _load(self, split: str) -> SplitArrays:
        if split != "train":
            raise ValueError(f"a shadow model's data module holds only a train split, not {split!r}")
        return self.train_split

    def has_split(self, split: str) -> bool:
        return split == "train"


def train_like_run(config: DictConfig, split: SplitArrays, epochs: int, seed: int) -> XrayClassifier:
    """Train a model (a shadow) on ``split`` with the audited run's recipe (model, optimiser,
    batch size, augmentation, and DP-SGD when the run used it), centrally for ``epochs``. Its
    DP-SGD noise and sampling are drawn from ``seed``, so an audit trains the same models every
    time (a site's real rounds draw theirs from a secret source)."""
    classifier = build_classifier(config, seed=seed)
    datamodule = ArraysDataModule(
        split, batch_size=int(config.data.batch_size), augment=config.data.get("augment"), seed=seed
    )
    trainer = build_trainer(config, max_epochs=epochs, lean=True)
    if config.get("privacy", {}).get("enabled"):
        settings = DPSettings.from_config(config.privacy)
        plan = plan_round(settings, len(split.labels), int(config.data.batch_size), epochs, num_rounds=1)
        source = SeededRandom(seed)
        classifier.private = PrivateTraining(plan, settings.max_grad_norm, settings.accountant, source)
        train(classifier, PoissonDataModule(datamodule, source), trainer)
    else:
        train(classifier, datamodule, trainer)
    return classifier


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """Offline LiRA: ``(phi - mu_out) / sigma_out`` with per-image OUT means and one pooled
    OUT standard deviation. ``shadow_phi`` and ``shadow_in`` are (shadows, images)."""
    out = np.where(shadow_in, np.nan, shadow_phi)
    counts = (~shadow_in).sum(0)
    mu = np.nanmean(out, axis=0)
    dof = counts.sum() - len(counts)
    sigma = np.sqrt(np.nansum((out - mu) ** 2) / dof) if dof > 0 else 0.0
    return (target_phi - mu) / max(float(sigma), 1e-12)


def attack_metrics(scores: np.ndarray, member: np.ndarray) -> dict[str, Any]:
    """ROC-AUC, TPR at 0.1% and 1% FPR, the FPR resolution and the ROC curve of one attack."""
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    n_non = int((~member).sum())
    return {
        "auc": float(roc_auc_score(member, scores)),
        "tpr_at_fpr": {f"{target:g}": float(tpr[fpr <= target].max()) for target in TARGET_FPRS},
        "fpr_resolution": 1.0 / n_non,
        "n_members": int(member.sum()),
        "n_non_members": n_non,
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "scores": {"members": scores[member].tolist(), "non_members": scores[~member].tolist()},
    }


def membership_audit(
    net: nn.Module,
    config: DictConfig,
    data: MembershipData,
    n_shadows: int,
    shadow_epochs: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Both attacks on ``net`` (trained with ``config``); ``n_shadows=0`` runs the loss attack only."""
    result = {"loss": attack_metrics(loss_scores(net, data), data.member)}
    if n_shadows:
        assignment = shadow_assignment(n_shadows, len(data.labels), seed)
        shadow_phi = []
        for i, chosen in enumerate(assignment):
            log.info(
                "shadow model %d/%d: %d images, %d epochs", i + 1, n_shadows, chosen.sum(), shadow_epochs
            )
            shadow = train_like_run(config, data.subset(chosen), shadow_epochs, seed=seed + 1 + i)
            shadow_phi.append(scaled_confidence(shadow.net, data))
        scores = lira_scores(scaled_confidence(net, data), np.stack(shadow_phi), assignment)
        result["lira"] = attack_metrics(scores, data.member) | {
            "variant": "offline, fixed variance",
            "shadow_models": n_shadows,
            "shadow_epochs": shadow_epochs,
            "shadow_data": "random halves of the pooled member and non-member images; each image "
            "is outside the training set of exactly half of the shadows",
        }
    result["n_patients"] = {
        "members": len({k for k, m in zip(data.patient_keys, data.member) if m}),
        "non_members": len({k for k, m in zip(data.patient_keys, data.member) if not m}),
    }
    return result
