"""The model under audit: its network, its file's hash and the configuration it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.ingestion.pseudonym import file_sha256
from pipeline.training.checkpoints import load_model

# Hydra records every run's composed configuration here, in the run's output folder.
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


@dataclass(frozen=True)
class AuditTarget:
    """A trained ``model.pt`` and how it was trained (model, data, federation, privacy)."""

    checkpoint: Path
    net: nn.Module
    config: DictConfig
    sha256: str
    config_source: str

    @property
    def private(self) -> bool:
        """Whether it was trained with DP-SGD."""
        return bool(self.config.get("privacy", {}).get("enabled"))

    @property
    def training_epochs(self) -> int:
        """Epochs every training image was seen: ``num_rounds x local_epochs``."""
        federation = self.config.federation
        return int(federation.num_rounds) * int(federation.local_epochs)

    def describe(self) -> dict:
        """What the report says about this model."""
        net = self.config.model.net
        norm = f" ({net.norm} norm)" if net.get("norm") else ""
        return {
            "checkpoint": str(self.checkpoint),
            "sha256": self.sha256,
            "model": f"{net.get('_target_')}{norm}",
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
    recorded = checkpoint.parent / HYDRA_CONFIG
    if recorded.is_file():
        # Hydra's record of the run's config: a mapping.
        config, source = cast(DictConfig, OmegaConf.load(recorded)), str(recorded)
    else:
        config = cast(DictConfig, OmegaConf.merge(cfg, {"model": info["config"]}))
        source = "the audit's own configuration (no .hydra/config.yaml next to the checkpoint)"
    if info.get("image_size") is not None:
        config.data.image_size = info["image_size"]
    return AuditTarget(checkpoint, net, config, file_sha256(checkpoint), source)
