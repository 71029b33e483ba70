"""DP-SGD for the LightningModule: Opacus's Poisson sampling, noise and accountant, with
per-sample clipping by :class:`pipeline.privacy.clipping.PerSampleClipper`.

:class:`pipeline.training.classifier.XrayClassifier` holds a :class:`PrivateTraining`: its
``configure_optimizers`` wraps the optimizer with :meth:`PrivateTraining.optimizer`
(Opacus's ``DPOptimizerFastGradientClipping``: Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` on the clipped sum, the accountant's step hook) and its
``backward`` hook calls :meth:`PrivateTraining.backward` (per-sample clipping). The data
module is wrapped by :class:`PoissonDataModule` (Opacus's ``DPLightningDataModule``).

Augmentation multiplicity (``privacy.augmentation_multiplicity`` K > 1, De et al. 2022): the
data module returns each Poisson-sampled example K times in a row, each time augmented afresh,
and the clipper clips the mean of an example's K view gradients. Sampling, noise and
accounting are those of the examples (expected batch size unchanged); a step costs about K
times the compute.

Noise and Poisson sampling come from the round's :data:`pipeline.privacy.randomness.RandomSource`
(a fresh cryptographically secure stream at the site), never from a seed in the job's config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import torch
from omegaconf import DictConfig
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import wrap_collate_with_empty
from opacus.lightning import DPLightningDataModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from pipeline.privacy.clipping import PerSampleClipper
from pipeline.privacy.randomness import RandomSource, SecurePoissonSampler

ACCOUNTANTS = ("rdp", "prv")
log = logging.getLogger("fedrad.privacy")


@dataclass(frozen=True)
class DPSettings:
    """The ``privacy`` config group (see ``conf/privacy/dp_sgd.yaml``)."""

    noise_multiplier: float | None
    target_epsilon: float | None
    epsilon_budget: float
    max_grad_norm: float
    delta: float | None
    accountant: str
    augmentation_multiplicity: int = 1

    @classmethod
    def from_config(cls, privacy: DictConfig) -> "DPSettings":
        accountant = str(privacy.accountant)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if privacy.noise_multiplier is None and privacy.target_epsilon is None:
            raise ValueError("set privacy.noise_multiplier or privacy.target_epsilon")
        return cls(
            noise_multiplier=_optional_float(privacy.noise_multiplier),
            target_epsilon=_optional_float(privacy.target_epsilon),
            epsilon_budget=float(privacy.epsilon_budget),
            max_grad_norm=float(privacy.max_grad_norm),
            delta=_optional_float(privacy.delta),
            accountant=accountant,
            augmentation_multiplicity=int(privacy.get("augmentation_multiplicity", 1)),
        )

    def delta_for(self, num_examples: int) -> float:
        """``privacy.delta``, else ``1 / (10 N)``; always below ``1 / N``."""
        delta = self.delta if self.delta is not None else 1.0 / (10 * num_examples)
        if delta >= 1.0 / num_examples:
            raise ValueError(
                f"privacy.delta={delta:g} is not below 1/N = {1 / num_examples:g} for a site with "
                f"{num_examples} training examples: lower it or leave it null"
            )
        return delta


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class RoundPlan:
    """What one site's DP-SGD round does: the accountant sees ``steps`` steps of
    Poisson-sampled batches (rate ``sample_rate``) with noise ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    expected_batch_size: int

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The round as Opacus accountant history entries."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


def plan_round(
    settings: DPSettings, num_examples: int, batch_size: int, local_epochs: int, num_rounds: int
) -> RoundPlan:
    """The round a site with ``num_examples`` training images runs.

    With ``privacy.target_epsilon`` the noise is calibrated so that ``num_rounds`` rounds of
    ``local_epochs`` epochs spend exactly the target at the site's delta.
    """
    batches = math.ceil(num_examples / batch_size)  # Opacus: sample rate 1 / len(loader)
    sample_rate = 1.0 / batches
    steps = local_epochs * batches
    delta = settings.delta_for(num_examples)
    noise = settings.noise_multiplier
    if noise is None:
        noise = _calibrated_noise(
            settings.target_epsilon, delta, sample_rate, steps * num_rounds, settings.accountant
        )
    return RoundPlan(noise, sample_rate, steps, delta, int(num_examples * sample_rate))


@lru_cache(maxsize=64)
def _calibrated_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus's noise calibration (seconds of RDP search), once per process and plan."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def epsilon_of(history: Sequence[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of an Opacus accountant history (0 when empty): entries
    ``(noise multiplier, sample rate, steps)``, as tuples or as lists read back from JSON."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(entry) for entry in history]
    return float(acc.get_epsilon(delta))


def check_dp_compatible(net: nn.Module) -> None:
    """Raise a clear error unless Opacus (and per-sample clipping) can train ``net``."""
    problems = [str(error) for error in ModuleValidator.validate(net, strict=False)]
    problems += [
        f"{name}: in-place {type(module).__name__}"
        for name, module in net.named_modules()
        if getattr(module, "inplace", False)
    ]
    if problems:
        raise ValueError(
            "this model cannot be trained with DP-SGD: "
            + "; ".join(problems)
            + ". Use model=resnet18_groupnorm (group norm, no in-place operations) or a model "
            "fixed with opacus.validators.ModuleValidator.fix"
        )


class SourcedNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for already clipped and summed gradients, whose Gaussian noise comes
    from a :data:`RandomSource` (one draw per step for all parameters) instead of torch's
    global generator."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, source: RandomSource, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.source = source

    def add_noise(self) -> None:
        """Add N(0, (noise_multiplier x max_grad_norm)^2) to every summed gradient."""
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        sizes = [p.summed_grad.numel() for p in self.params]
        noise = self.source.normal(sum(sizes), std) if std > 0 else torch.zeros(sum(sizes))
        for p, chunk in zip(self.params, noise.split(sizes)):
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            p.grad = (summed + chunk.to(summed.device, summed.dtype).view_as(summed)).view_as(p)
            _mark_as_processed(p.summed_grad)


class PrivateTraining:
    """DP-SGD state of one site's round: clipping, noise, sampling randomness and the accountant.

    ``augmentation_multiplicity``: views of each example in a batch (see :class:`PoissonDataModule`).
    """

    def __init__(
        self,
        plan: RoundPlan,
        max_grad_norm: float,
        accountant: str,
        source: RandomSource,
        augmentation_multiplicity: int = 1,
    ) -> None:
        self.plan = plan
        self.max_grad_norm = max_grad_norm
        self.augmentation_multiplicity = augmentation_multiplicity
        self.accountant: IAccountant = create_accountant(accountant)
        self.source = source
        self.clipper: PerSampleClipper | None = None

    def optimizer(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> SourcedNoiseOptimizer:
        """Attach per-sample clipping to ``net``; wrap ``optimizer`` to add noise and account."""
        check_dp_compatible(net)
        if self.clipper is not None:
            self.clipper.remove()
        self.clipper = PerSampleClipper(net, self.max_grad_norm, views=self.augmentation_multiplicity)
        private = SourcedNoiseOptimizer(
            optimizer,
            source=self.source,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.plan.expected_batch_size,
            loss_reduction="mean",
        )
        private.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.plan.sample_rate))
        return private

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Clipped per-sample gradients of the batch-mean ``loss``; returns their norms."""
        if self.clipper is None:
            raise RuntimeError("PrivateTraining.optimizer() must wrap the optimizer first")
        return self.clipper.backward(loss)


class PoissonDataModule(DPLightningDataModule):
    """Opacus's Lightning data module (Poisson-sampled training batches, each example in a
    batch with probability 1 / number of batches) with coins from ``source``; it still reports
    the wrapped module's training-set size.

    With ``augmentation_multiplicity`` K > 1 a batch of B sampled examples holds B x K rows:
    each example K times in a row, each row through the dataset's (random) training transform.
    """

    def __init__(self, datamodule, source: RandomSource, augmentation_multiplicity: int = 1) -> None:
        super().__init__(datamodule)
        self.source = source
        self.augmentation_multiplicity = augmentation_multiplicity

    def train_dataloader(self) -> DataLoader:
        loader = self.datamodule.train_dataloader()
        dataset = loader.dataset
        sampler = SecurePoissonSampler(
            num_samples=len(dataset), sample_rate=1 / len(loader), source=self.source
        )
        views = self.augmentation_multiplicity
        if views > 1 and getattr(dataset, "transform", None) is None:
            log.warning(
                "privacy.augmentation_multiplicity=%d without training augmentation (data.augment): "
                "the views are identical, a step costs more for the same gradient",
                views,
            )
        sample = dataset[0]
        collate = wrap_collate_with_empty(
            collate_fn=loader.collate_fn,
            batch_first=True,
            rand_on_empty=False,
            sample_empty_shapes=[(0, *x.shape) for x in sample],
            dtypes=[x.dtype for x in sample],
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler if views == 1 else RepeatedViews(sampler, views),
            collate_fn=collate,
            num_workers=loader.num_workers,
            worker_init_fn=loader.worker_init_fn,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
        )

    @property
    def num_train_examples(self) -> int:
        return self.datamodule.num_train_examples


class RepeatedViews:
    """A batch sampler that lists each index of ``batches``' batches ``views`` times in a row."""

    def __init__(self, batches: Iterable[list[int]], views: int) -> None:
        self.batches = batches
        self.views = views

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield [index for index in batch for _ in range(self.views)]

    def __len__(self) -> int:
        return len(cast(Sized, self.batches))
