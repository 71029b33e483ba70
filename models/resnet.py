"""ResNet-18 as in the PriMIA study: 1 input channel, 3 classes, batch or group norm.

Built on :class:`monai.networks.nets.ResNet` with two fixes:

* MONAI passes ``norm`` only to the stem; the residual blocks and downsample branches
  always get batch norm. :class:`XrayResNet` threads ``norm`` (and ``act``) through every
  layer, so ``norm="group"`` really leaves no batch norm behind (what DP-SGD needs).
* MONAI's block adds the shortcut in place and uses in-place ReLU, which per-sample
  gradient hooks (Opacus) cannot follow. ``inplace=False`` builds the out-of-place variant.

``weight_standardisation=True`` makes every convolution a :class:`models.weight_standardisation.WSConv2d`.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers.utils import get_act_layer
from monai.networks.nets.resnet import ResNet, ResNetBlock

from models.weight_standardisation import standardise_convolutions

Norm = Literal["batch", "group"]


class OutOfPlaceBlock(ResNetBlock):
    """MONAI's basic residual block with an out-of-place shortcut addition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


class XrayResNet(ResNet):
    """MONAI ResNet whose residual layers use the network's own ``norm`` and ``act``."""

    def __init__(self, *args, norm: str | tuple = "batch", act: str | tuple = "relu", **kwargs):
        # _make_layer runs inside ResNet.__init__, so the choice must be set beforehand.
        object.__setattr__(self, "_layer_norm", norm)
        object.__setattr__(self, "_layer_act", act)
        super().__init__(*args, **(kwargs | {"norm": norm, "act": act}))

    def _make_layer(self, block, planes, blocks, spatial_dims, shortcut_type, stride=1, norm=None):
        layers = super()._make_layer(
            block, planes, blocks, spatial_dims, shortcut_type, stride, norm=self._layer_norm
        )
        for module in layers:
            module.act = get_act_layer(name=self._layer_act)
        return layers


def _norm_spec(norm: Norm, groups: int) -> str | tuple:
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": groups})
    raise ValueError(f"model.net.norm must be 'batch' or 'group', got {norm!r}")


def resnet18(
    in_channels: int = 1,
    num_classes: int = 3,
    norm: Norm = "batch",
    groups: int = 32,
    inplace: bool = True,
    weight_standardisation: bool = False,
) -> XrayResNet:
    """ResNet-18 with the standard 7x7 stride-2 stem and 1x1 projection shortcuts.

    ``groups`` is the number of group-norm groups (used when ``norm="group"``);
    ``inplace=False`` gives the variant that Opacus can wrap; ``weight_standardisation``
    standardises every convolution's weight (with ``norm="group"``: De et al.'s DP-SGD network).
    """
    net = XrayResNet(
        block=ResNetBlock if inplace else OutOfPlaceBlock,
        layers=[2, 2, 2, 2],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=num_classes,
        norm=_norm_spec(norm, groups),
        act=("relu", {"inplace": inplace}),
    )
    return standardise_convolutions(net) if weight_standardisation else net
