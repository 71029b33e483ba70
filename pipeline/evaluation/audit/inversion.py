"""Gradient inversion: what an adversary holding one site's update could see of its images.

The attack is *inverting gradients* (Geiping et al., NeurIPS 2020): starting from a random
image, Adam (on the sign of the gradient, with step decay at 3/8, 5/8 and 7/8 of the
iterations) minimises ``1 - cos(grad(dummy), update)`` over all parameters plus a total-variation
prior, keeping pixels in [0, 1]. For a batch of one image the label is read from the update
itself (the last layer's bias gradient is negative only for the true class, as in iDLG);
for larger batches the labels are assumed known, which favours the attacker.

The update is the one a site sends after one local step on the batch (FedSGD; several local
steps only make the attack harder): the batch-mean gradient without protection, or under
DP-SGD exactly what the project's DP-SGD step computes, through
:class:`pipeline.privacy.dp.PrivateTraining` (per-sample clipping to ``max_grad_norm``, Gaussian
noise of standard deviation ``noise_multiplier x max_grad_norm`` on the sum, divided by the
batch size).

Under secure aggregation the coordinator never holds one site's update, only the sum over
sites: this attack shows what someone who does hold a single site's update could do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pipeline.privacy.dp import PrivateTraining, RoundPlan
from pipeline.privacy.randomness import SeededRandom

Gradient = list[torch.Tensor]


@dataclass(frozen=True)
class DPUpdate:
    """How a DP-SGD site forms its update."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class InversionSettings:
    """The attack's optimisation (``audit.inversion`` in the config)."""

    iterations: int = 400
    learning_rate: float = 0.1
    tv_weight: float = 0.01
    seed: int = 0


def site_update(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, dp: DPUpdate | None, seed: int
) -> Gradient:
    """The gradient one site sends for this batch (training mode), with DP-SGD when ``dp`` is set.

    The noise has the site's distribution but is drawn from ``seed``, so that the audit gives the
    same result every time it is run (a site's real updates draw theirs from a secret source)."""
    net.train()
    params = list(net.parameters())
    if dp is None:
        return [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(images), labels), params)]
    plan = RoundPlan(
        dp.noise_multiplier, sample_rate=1.0, steps=1, delta=0.0, expected_batch_size=len(labels)
    )
    private = PrivateTraining(plan, dp.max_grad_norm, accountant="rdp", source=SeededRandom(seed))
    optimizer = private.optimizer(net, torch.optim.SGD(params, lr=1.0))
    try:
        optimizer.zero_grad()
        private.backward(F.cross_entropy(net(images), labels))
        optimizer.pre_step()
        # pre_step() leaves the clipped, noised gradient of every parameter in p.grad.
        return [cast(torch.Tensor, p.grad).detach().clone() for p in params]
    finally:
        optimizer.zero_grad()
        if private.clipper is not None:  # set by private.optimizer()
            private.clipper.remove()


def infer_label(net: nn.Module, update: Gradient) -> torch.Tensor:
    """The label of a one-image update: the class whose last-layer bias gradient is lowest."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear) and m.bias is not None][-1]
    index = next(i for i, p in enumerate(net.parameters()) if p is last.bias)
    return update[index].argmin().reshape(1)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (
        images[..., :, 1:] - images[..., :, :-1]
    ).abs().mean()


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` of two gradients taken as single vectors."""
    dot = sum((x * y).sum() for x, y in zip(a, b))
    # sum() of tensors is a tensor (its start, 0, only when a gradient has no tensors).
    squared_a = cast(torch.Tensor, sum(x.pow(2).sum() for x in a))
    squared_b = cast(torch.Tensor, sum(y.pow(2).sum() for y in b))
    norms = torch.sqrt(squared_a) * torch.sqrt(squared_b)
    return 1 - dot / norms.clamp_min(1e-12)


def invert(
    net: nn.Module,
    update: Gradient,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    settings: InversionSettings,
) -> torch.Tensor:
    """Images in [0, 1] of ``shape`` whose gradient matches ``update`` in direction."""
    net.train()
    params = list(net.parameters())
    generator = torch.Generator().manual_seed(settings.seed)
    dummy = torch.rand(shape, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=settings.learning_rate)
    milestones = [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for _ in range(settings.iterations):
        optimizer.zero_grad()
        gradient = torch.autograd.grad(F.cross_entropy(net(dummy), labels), params, create_graph=True)
        loss = cosine_distance(gradient, update) + settings.tv_weight * total_variation(dummy)
        (dummy.grad,) = torch.autograd.grad(loss, dummy)
        dummy.grad.sign_()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            dummy.clamp_(0, 1)
    return dummy.detach()


def image_similarity(reconstructed: torch.Tensor, original: torch.Tensor) -> dict[str, float]:
    """SSIM and PSNR (dB) of images in [0, 1] (torchmetrics), averaged over the batch."""
    return {
        # a tensor: only return_full_image=True makes it a pair
        "ssim": float(
            cast(torch.Tensor, structural_similarity_index_measure(reconstructed, original, data_range=1.0))
        ),
        "psnr": float(peak_signal_noise_ratio(reconstructed, original, data_range=1.0)),
    }


def chance_similarity(
    original: torch.Tensor, population: torch.Tensor, seed: int = 0
) -> dict[str, dict[str, float]]:
    """What guesses without any update score: uniform noise, a flat image of the original's
    mean intensity, and the mean image of other X-rays (``population``, the strictest)."""
    noise = torch.rand(original.shape, generator=torch.Generator().manual_seed(seed))
    flat = original.mean(dim=(1, 2, 3), keepdim=True).expand_as(original)
    average = population.mean(0, keepdim=True).expand_as(original)
    return {
        "uniform_noise": image_similarity(noise, original),
        "flat_mean_intensity": image_similarity(flat, original),
        "population_mean_image": image_similarity(average, original),
    }


def inversion_attack(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    dp: DPUpdate | None,
    settings: InversionSettings,
) -> tuple[dict, torch.Tensor]:
    """Attack the update of ``images``; returns the scores and the reconstructions."""
    update = site_update(net, images, labels, dp, settings.seed)
    if len(labels) == 1:
        attack_labels, label_source = infer_label(net, update), "inferred from the update"
    else:
        attack_labels, label_source = labels, "known to the attacker"
    reconstructed = invert(net, update, attack_labels, tuple(images.shape), settings)
    result = image_similarity(reconstructed, images) | {
        "protection": "none" if dp is None else "dp-sgd",
        "labels": label_source,
        "labels_correct": bool((attack_labels == labels).all()),
    }
    if dp is not None:
        result |= {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm}
    return result, reconstructed


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (N, 1, H, W) area-averaged to ``size`` x ``size``."""
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="area")
