"""DenseNet-121 for single-channel chest radiographs (MONAI implementation)."""

from __future__ import annotations

from monai.networks.nets import DenseNet121


def densenet121(in_channels: int = 1, num_classes: int = 3, dropout_prob: float = 0.0) -> DenseNet121:
    """2-D DenseNet-121 with ``in_channels`` inputs and ``num_classes`` logits."""
    return DenseNet121(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        dropout_prob=dropout_prob,
    )
