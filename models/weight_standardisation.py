"""Weight-standardised convolutions (Qiao et al. 2019), used with group norm for DP-SGD
(De et al. 2022): each output channel's kernel is standardised before the convolution,

    w_hat = (w - mean(w)) / sqrt(var(w) + eps)

over the channel's ``in_channels x kernel`` weights (biased variance). The parameters stay
``weight`` and ``bias``, so a state dict loads into either kind of convolution.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn


class WSConv2d(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` that convolves with its standardised weight."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardised_weight(self) -> torch.Tensor:
        """``w_hat``, the kernel the convolution uses."""
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (self.weight - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardised_weight(), self.bias)


Net = TypeVar("Net", bound=nn.Module)


def standardise_convolutions(net: Net) -> Net:
    """Replace every plain :class:`torch.nn.Conv2d` of ``net`` by a :class:`WSConv2d` with the
    same options and parameters; returns ``net``."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d:
                conv = WSConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
    return net
