"""The allow-list of components fedrad builds from a configuration: networks and optimisers.

A config names a component with ``_target_`` as Hydra does, but nothing outside these tables is
ever imported or called: a site builds what a coordinator's experiment names only from here, so
a ``_target_`` such as ``pathlib.Path.write_text`` is refused instead of run. Each entry lists
the options it takes and their types; an unknown option or a value of another type is refused
too. To add a model, add its builder and options to :data:`NETWORKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from models.densenet import densenet121
from models.resnet import resnet18
from models.small_cnn import SmallCNN


class ForbiddenComponent(PermissionError):
    """A config names a component, an option or a value outside the allow-list."""


@dataclass(frozen=True)
class Component:
    """One buildable component and the types of the options it accepts."""

    build: Callable[..., Any]
    options: Mapping[str, type | tuple[type, ...]]


_ADAM = {"lr": float, "weight_decay": float, "eps": float, "amsgrad": bool, "betas": list}
NETWORKS: dict[str, Component] = {
    "models.resnet.resnet18": Component(
        resnet18,
        {
            "in_channels": int,
            "num_classes": int,
            "norm": str,
            "groups": int,
            "inplace": bool,
            "weight_standardisation": bool,
        },
    ),
    "models.densenet.densenet121": Component(
        densenet121, {"in_channels": int, "num_classes": int, "dropout_prob": float}
    ),
    "models.small_cnn.SmallCNN": Component(SmallCNN, {"in_channels": int, "num_classes": int, "width": int}),
}
OPTIMIZERS: dict[str, Component] = {
    "torch.optim.Adam": Component(torch.optim.Adam, _ADAM),
    "torch.optim.AdamW": Component(torch.optim.AdamW, _ADAM),
    "torch.optim.SGD": Component(
        torch.optim.SGD,
        {"lr": float, "momentum": float, "weight_decay": float, "nesterov": bool, "dampening": float},
    ),
}


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    """Strict scalar typing: a bool is not a number; an int is a valid float; lists of numbers."""
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is list:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, float) for v in value)
    return isinstance(value, expected)


def checked(
    node: Mapping[str, Any], table: Mapping[str, Component], where: str, partial_call: bool = False
) -> tuple[Component, dict[str, Any]]:
    """The allow-listed component ``node`` names and its options; raises :class:`ForbiddenComponent`."""
    if not isinstance(node, Mapping):
        raise ForbiddenComponent(f"{where} must be a mapping with a _target_")
    target = node.get("_target_")
    if target not in table:
        raise ForbiddenComponent(
            f"{where}._target_={target!r} is not on the allow-list ({', '.join(sorted(table))})"
        )
    component = table[str(target)]
    options: dict[str, Any] = {}
    for key, value in node.items():
        if key == "_target_":
            continue
        if key == "_partial_" and partial_call and value is True:
            continue
        if key not in component.options:
            raise ForbiddenComponent(
                f"{where}.{key} is not an option of {target} "
                f"(allowed: {', '.join(sorted(component.options))})"
            )
        if value is not None and not _type_ok(value, component.options[key]):
            raise ForbiddenComponent(f"{where}.{key}={value!r} has the wrong type for {target}")
        options[key] = value
    return component, options


def build_network(node: Mapping[str, Any], where: str = "model.net") -> nn.Module:
    """The network ``node`` (a ``model.net`` config) names, built from the allow-list."""
    component, options = checked(node, NETWORKS, where)
    return component.build(**options)


def build_optimizer(node: Mapping[str, Any], where: str = "model.optimizer") -> partial:
    """An optimiser constructor waiting for the parameters (Hydra's ``_partial_: true``)."""
    component, options = checked(node, OPTIMIZERS, where, partial_call=True)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return partial(component.build, **options)
