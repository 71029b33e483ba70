"""Load locally stored pretrained weights into a network (never downloads anything).

Accepted files (``torch.save``): a bare state dict, fedrad's ``model.pt`` (``{"state_dict": ...}``)
or a Lightning checkpoint of :class:`pipeline.training.classifier.XrayClassifier` (keys prefixed ``net.``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

LIGHTNING_PREFIX = "net."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors stored in ``path``, unwrapped from a checkpoint when needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (model.weights_path)")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    state = stored.get("state_dict", stored) if isinstance(stored, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    if state and all(k.startswith(LIGHTNING_PREFIX) for k in state):
        state = {k[len(LIGHTNING_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _to_grayscale_inputs(
    stored: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """RGB weights (e.g. ImageNet) for a one-channel network: a first convolution with three
    input channels where the network has one is summed over them (the response to a gray
    image is the same)."""
    adapted = dict(stored)
    for key, tensor in stored.items():
        target = own.get(key)
        if (
            target is not None
            and tensor.dim() == 4
            and tensor.shape[1] == 3
            and target.shape[1] == 1
            and tensor.shape[0] == target.shape[0]
            and tensor.shape[2:] == target.shape[2:]
        ):
            adapted[key] = tensor.sum(dim=1, keepdim=True)
    return adapted


def load_weights(net: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Copy the weights in ``path`` into ``net``; return the names of the tensors not loaded.

    ``strict=True`` raises a ValueError listing every missing, unexpected and
    shape-mismatched key; ``strict=False`` loads the tensors whose names and shapes match
    (e.g. a backbone with a different head) and raises only when none does.
    """
    stored = _to_grayscale_inputs(read_state_dict(path), net.state_dict())
    own = net.state_dict()
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(stored[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(stored)
        if stored[k].shape != own[k].shape
    )
    problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": mismatched}
    report = "; ".join(
        f"{name} ({len(keys)}): {', '.join(keys[:10])}" for name, keys in problems.items() if keys
    )
    matching = {k: v for k, v in stored.items() if k in own and v.shape == own[k].shape}
    if (strict and report) or not matching:
        raise ValueError(
            f"weights in {path} do not fit {type(net).__name__}: {report or 'no tensor matches'}. "
            "Check model.net matches the network the file was saved from, "
            "or set model.weights_strict=false to load only the matching tensors."
        )
    net.load_state_dict(matching, strict=False)
    return [k for k in own if k not in matching]
