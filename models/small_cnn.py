"""A small convolutional network: seconds per epoch on a CPU, for tests and smoke runs."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv / group-norm / ReLU / max-pool stages (``width``, 2x, 4x channels), global
    average pooling and a linear head.

    It has no batch norm and no in-place operation, so it also works under DP-SGD.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        channels = [in_channels, width, 2 * width, 4 * width]
        stages: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.GroupNorm(num_groups=4, num_channels=c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
