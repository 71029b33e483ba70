"""DP-SGD for the LightningModule: Opacus's Poisson sampling, noise and accountant, with
per-sample clipping by :class:`pipeline.privacy.clipping.PerSampleClipper`.

:class:`pipeline.classifier.XrayClassifier` holds a :class:`PrivateTraining`: its
``configure_optimizers`` wraps the optimizer with :meth:`PrivateTraining.optimizer`
(Opacus's ``DPOptimizerFastGradientClipping``: Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` on the clipped sum, the accountant's step hook) and its
``backward`` hook calls :meth:`PrivateTraining.backward` (per-sample clipping). The data
module is wrapped by :class:`PoissonDataModule` (Opacus's ``DPLightningDataModule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.lightning import DPLightningDataModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from pipeline.privacy.clipping import PerSampleClipper

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class DPSettings:
    """The ``privacy`` config group (see ``conf/privacy/dp_sgd.yaml``)."""

    noise_multiplier: float | None
    target_epsilon: float | None
    epsilon_budget: float
    max_grad_norm: float
    delta: float | None
    accountant: str

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
        noise = get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps * num_rounds,
            accountant=settings.accountant,
        )
    return RoundPlan(noise, sample_rate, steps, delta, int(num_examples * sample_rate))


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of an Opacus accountant history (0 when empty)."""
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
            "this model cannot be trained with DP-SGD: " + "; ".join(problems)
            + ". Use model=resnet18_groupnorm (group norm, no in-place operations) or a model "
            "fixed with opacus.validators.ModuleValidator.fix"
        )


class PrivateTraining:
    """DP-SGD state of one site's round: clipping, noise and the accountant."""

    def __init__(self, plan: RoundPlan, max_grad_norm: float, accountant: str) -> None:
        self.plan = plan
        self.max_grad_norm = max_grad_norm
        self.accountant: IAccountant = create_accountant(accountant)
        self.clipper: PerSampleClipper | None = None

    def optimizer(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> DPOptimizerFastGradientClipping:
        """Attach per-sample clipping to ``net``; wrap ``optimizer`` to add noise and account."""
        check_dp_compatible(net)
        if self.clipper is not None:
            self.clipper.remove()
        self.clipper = PerSampleClipper(net, self.max_grad_norm)
        private = DPOptimizerFastGradientClipping(
            optimizer,
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
    """Opacus's Lightning data module (Poisson-sampled training batches) that still reports
    the wrapped module's training-set size."""

    @property
    def num_train_examples(self) -> int:
        return self.datamodule.num_train_examples

