"""The model under audit: its network, its file's hash and the configuration it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.evaluation.provenance import HYDRA_CONFIG, network_name, recorded_config
from pipeline.ingestion.pseudonym import file_sha256
from pipeline.training.checkpoints import load_model


@dataclass(frozen=True)
class AuditTarget:
    """A trained ``model.pt`` and how it was trained (model, data, federation, privacy)."""

    checkpoint: Path
    net: nn.Module
    config: DictConfig
    sha256: str
    config_source: str
    round: int | None = None

    @property
    def private(self) -> bool:
        """Whether it was trained with DP-SGD."""
        return bool(self.config.get("privacy", {}).get("enabled"))

    @property
    def training_epochs(self) -> int:
        """Epochs every training image was seen: ``num_rounds x local_epochs``."""
        federation = self.config.federation
        return int(federation.num_rounds) * int(federation.local_epochs)

    @property
    def name(self) -> str:
        """What the report calls it: network, image size, DP-SGD and round, e.g. ``ResNet18
        (batch norm) at 64 px, round 7``."""
        net = cast(dict, OmegaConf.to_container(self.config.model.net, resolve=True))
        dp = ", DP-SGD" if self.private else ""
        round_ = f", round {self.round}" if self.round is not None else ""
        return f"{network_name(net)} at {self.config.data.get('image_size')} px{dp}{round_}"

    def describe(self) -> dict:
        """What the report says about this model."""
        net = cast(dict, OmegaConf.to_container(self.config.model.net, resolve=True))
        return {
            "checkpoint": str(self.checkpoint),
            "sha256": self.sha256,
            "round": self.round,
            "model": network_name(net),
            "image_size": self.config.data.get("image_size"),
            "private": self.private,
            "training_epochs": self.training_epochs,
            "config_source": self.config_source,
        }


def load_target(checkpoint: str | Path, cfg: DictConfig) -> AuditTarget:
    """Load ``checkpoint`` with the configuration of the run that wrote it.

    That is Hydra's record ``.hydra/config.yaml`` next to it when present (every
    ``scripts/simulate.py`` / ``scripts/train.py`` run has one); otherwise ``cfg`` with its
    ``model`` section replaced by the one stored in the checkpoint.
    """
    checkpoint = Path(checkpoint)
    net, info = load_model(checkpoint)
    recorded = recorded_config(checkpoint)
    if recorded is not None:
        config, source = recorded, str(checkpoint.parent / HYDRA_CONFIG)
    else:
        config = cast(DictConfig, OmegaConf.merge(cfg, {"model": info["config"]}))
        source = "the audit's own configuration (no .hydra/config.yaml next to the checkpoint)"
    if info.get("image_size") is not None:
        config.data.image_size = info["image_size"]
    return AuditTarget(checkpoint, net, config, file_sha256(checkpoint), source, info.get("round"))
