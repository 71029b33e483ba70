"""What a site decides for itself about a round, whatever the coordinator sends.

A deployed site takes these from its SuperNode's node config
(:class:`pipeline.contracts.messages.NodeConfig`), written by ``scripts/site.py`` from the site's
own ``governance`` config; a simulated site (one operator playing every site) from the
``governance`` section of the operator's config.

* ``allow_seeded_noise`` (node config ``allow-seeded-noise``, default false): whether a DP job may
  draw its noise from the job's seed (``privacy.debug_seeded_noise``, debugging only; such
  rounds are recorded as ``noise_source: seeded-debug``, not private);
* ``retrain_round`` (``retrain-round``, default ``refuse``): what the site does when asked to
  train a ``run:round`` it has already released under another global model or experiment:
  ``refuse``, or ``charge`` (train afresh with fresh noise, charged in full as a new round).
  The same request again is always answered with the bytes already released, uncharged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from pipeline.contracts.messages import NodeConfig

RETRAIN_POLICIES = ("refuse", "charge")


@dataclass(frozen=True)
class SitePolicy:
    """A site's own rules for seeded noise and for a round asked again (see the module docstring)."""

    allow_seeded_noise: bool = False
    retrain_round: str = "refuse"

    def __post_init__(self) -> None:
        if self.retrain_round not in RETRAIN_POLICIES:
            raise ValueError(
                f"governance.retrain_round={self.retrain_round!r}: expected one of {RETRAIN_POLICIES}"
            )

    @classmethod
    def for_site(cls, node_config: dict[str, Any], cfg: DictConfig) -> "SitePolicy":
        site = NodeConfig.read(node_config)
        if site is not None:
            return cls(allow_seeded_noise=site.allow_seeded_noise, retrain_round=site.retrain_round)
        governance = cfg.get("governance") or {}
        return cls(
            allow_seeded_noise=bool(governance.get("allow_seeded_noise", False)),
            retrain_round=str(governance.get("retrain_round", "refuse")),
        )
