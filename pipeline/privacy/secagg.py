"""SecAgg+ settings derived from the federation config, and the quantisation error bound.

Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with the client mod
``flwr.client.mod.secaggplus_mod``) already averages by example count under masking: a site
with ``n`` training examples sends ``[q, round-stochastically((q / T) * p)]`` where
``q = round(n / max_weight * T)`` is its quantised weight, ``T`` the quantisation range and
``p`` its parameters clipped to ``[-c, c]``; both parts are masked together. The coordinator
only learns the sums, ``Q = sum(q)`` and ``sum((q / T) * p)``, and divides the second by
``Q / T``. This module picks the protocol's parameters and states what that costs in precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig

MODULUS_RANGE = 2**32  # Flower's mask arithmetic: integers modulo 2**32
MIN_SITES = 3  # with two sites, each could subtract its own update from the sum


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of one federation (see ``conf/federation/fedavg.yaml``)."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout_s: float | None

    @classmethod
    def from_config(cls, federation: DictConfig, num_sites: int) -> "SecAggSettings":
        """``federation.secagg`` with every ``null`` derived from the number of sites."""
        if num_sites < MIN_SITES:
            raise ValueError(
                f"secure aggregation needs at least {MIN_SITES} sites, this federation has "
                f"{num_sites}: add sites or set federation.secure_aggregation=false"
            )
        secagg = federation.secagg
        shares = int(secagg.num_shares or num_sites)
        threshold = int(secagg.reconstruction_threshold or num_sites // 2 + 1)
        quantization = int(secagg.quantization_range or default_quantization_range(num_sites))
        if not 2 <= threshold < shares <= num_sites:
            raise ValueError(
                f"federation.secagg needs 2 <= reconstruction_threshold ({threshold}) < "
                f"num_shares ({shares}) <= number of sites ({num_sites})"
            )
        if num_sites * quantization >= MODULUS_RANGE:
            raise ValueError(
                f"federation.secagg.quantization_range={quantization} overflows the 2**32 mask "
                f"modulus when {num_sites} sites are summed: use at most "
                f"{default_quantization_range(num_sites)} (or leave it null)"
            )
        timeout = secagg.get("timeout_s")
        return cls(
            num_shares=shares,
            reconstruction_threshold=threshold,
            clipping_range=float(secagg.clipping_range),
            quantization_range=quantization,
            max_weight=float(secagg.max_weight),
            timeout_s=None if timeout is None else float(timeout),
        )

    def weight(self, num_examples: int) -> int:
        """The quantised weight ``q`` Flower's client mod puts into the masked vector."""
        return round(num_examples / self.max_weight * self.quantization_range)

    def check_site_update(self, num_examples: int, largest_magnitude: float) -> None:
        """Raise if a site's update would be clipped (and the aggregate silently biased)."""
        if num_examples > self.max_weight:
            raise ValueError(
                f"this site trains on {num_examples} examples but federation.secagg.max_weight="
                f"{self.max_weight:g}: set max_weight to at least the largest site's count"
            )
        if largest_magnitude > self.clipping_range:
            raise ValueError(
                f"a model parameter of magnitude {largest_magnitude:.4g} exceeds "
                f"federation.secagg.clipping_range={self.clipping_range:g} and would be clipped "
                "before masking: raise clipping_range (precision falls in proportion)"
            )

    def error_bound(self, example_counts: Sequence[int]) -> float:
        """Largest difference between the unmasked average and exact FedAvg, per parameter.

        For the sites that survive a round (counts ``n_i``, ``K`` of them, every parameter in
        ``[-c, c]``): stochastic rounding moves each site's scaled value by less than one
        quantisation step ``2c / T``, so the sum by less than ``K * 2c / T``; dividing by
        ``Q / T`` gives ``2cK / Q``. Rounding the weights ``n_i`` to ``q_i`` (by at most 1/2
        each) moves the weighted mean by at most ``cK / Q``. Hence ``|error| <= 3cK / Q`` with
        ``Q = sum(q_i)``, before the float32 cast of the result (at most ``c * 2**-24`` more).
        Sites quantise in float64 (:mod:`pipeline.federation.secure_aggregation`), where
        the integers up to ``T`` are exact; in float32 the bound would not hold.
        """
        total = sum(self.weight(n) for n in example_counts)
        return 3.0 * self.clipping_range * len(example_counts) / total


def default_quantization_range(num_sites: int) -> int:
    """The largest power of two ``T`` with ``num_sites * T < 2**32`` (no overflow of the sum)."""
    return 2 ** (32 - math.ceil(math.log2(num_sites + 1)))


def num_sites(cfg: DictConfig) -> int:
    """Sites in the federation: ``federation.num_sites`` when set (deployment), else ``data.sites``."""
    explicit = cfg.federation.get("num_sites")
    return int(explicit) if explicit else len(cfg.data.sites)
