"""The one model file format shared by training, the federation server and evaluation.

``model.pt`` is ``torch.save`` of a plain dict::

    {"state_dict": {name: tensor}, "config": <cfg.model as a dict>,
     "class_names": [...], "image_size": int | None, **extra}

so :func:`load_model` can rebuild the network without the run's Hydra config. A released
model's extras include its ``round`` and its :data:`OPERATING_THRESHOLD` (the pneumonia
threshold chosen on the federation's validation images, :mod:`pipeline.evaluation.threshold`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from models.registry import build_network
from pipeline.contracts.labels import CLASS_NAMES

StateDict = Mapping[str, torch.Tensor]
OPERATING_THRESHOLD = "operating_threshold"


def save_checkpoint(
    path: str | Path,
    model: nn.Module | StateDict,
    cfg: DictConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a network (or its state dict) with ``cfg.model`` and the label names to ``path``."""
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    data = cfg.get("data") or {}
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "config": OmegaConf.to_container(cfg.model, resolve=True),
        "class_names": list(CLASS_NAMES),
        "image_size": data.get("image_size"),
        **(extra or {}),
    }
    return _write(path, payload)


def _write(path: Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def copy_checkpoint(source: str | Path, target: str | Path, extra: Mapping[str, Any]) -> Path:
    """Write the checkpoint at ``source`` to ``target`` with ``extra`` added to its entries."""
    state, info = load_checkpoint(source)
    return _write(Path(target), {"state_dict": state, **info, **extra})


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict stored in ``path`` and everything else saved with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise ValueError(
            f"{path} is not a fedrad model checkpoint (expected keys 'state_dict' and 'config', "
            "as written by pipeline.training.checkpoints.save_checkpoint)"
        )
    state = payload.pop("state_dict")
    return state, payload


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network described in ``path`` and load its weights (in eval mode)."""
    state, info = load_checkpoint(path)
    net = build_network(info["config"]["net"], where=f"{path}: config.net")
    net.load_state_dict(state)
    return net.eval(), info
