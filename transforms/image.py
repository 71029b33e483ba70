"""Image-level transforms on channel-first arrays: resizing and training augmentation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureType, RandAffine, Randomizable, RandRotate, RandZoom, Resize


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image (H, W) to float32 (size, size) with area averaging.

    Area interpolation is linear, so ``resize(1 - x) == 1 - resize(x)`` and values stay
    within the input's range.
    """
    if image.ndim != 2:
        raise ValueError(f"resize_square expects a 2-D image, got shape {image.shape}")
    # MONAI annotates Resize's input as a tensor; it documents and accepts an array.
    resized = Resize(spatial_size=(size, size), mode="area")(image[None].astype(np.float32))  # type: ignore[arg-type]
    return np.asarray(resized, np.float32)[0]


class RandTranslateFraction(Randomizable):
    """Random shift by up to ``fraction`` of the image height / width (RandAffine in pixels).

    Input and output: tensor (C, H, W).
    """

    def __init__(self, fraction: float, prob: float) -> None:
        self.fraction = fraction
        self.prob = prob
        self._by_shape: dict[tuple[int, ...], RandAffine] = {}

    def randomize(self, data: Any = None) -> None:
        """Randomness is drawn by the shape-specific RandAffine from this object's state."""

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for affine in self._by_shape.values():
            affine.set_random_state(state=self.R)
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        shape = tuple(image.shape[1:])
        if shape not in self._by_shape:
            affine = RandAffine(
                prob=self.prob,
                translate_range=[self.fraction * n for n in shape],
                padding_mode="border",
            )
            affine.set_random_state(state=self.R)
            self._by_shape[shape] = affine
        return self._by_shape[shape](image)


def build_augmentation(
    rotate_degrees: float, translate_fraction: float, scale_fraction: float, prob: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training augmentation for chest X-rays: small rotation, shift and zoom, no flips.

    Returns a callable mapping a float tensor (1, H, W) to a plain tensor of the same shape;
    each step fires independently with probability ``prob``. Seed it with
    ``.set_random_state(seed)``.
    """
    return Compose(
        [
            RandRotate(range_x=math.radians(rotate_degrees), prob=prob, padding_mode="border"),
            RandTranslateFraction(translate_fraction, prob),
            RandZoom(
                prob=prob,
                min_zoom=1 - scale_fraction,
                max_zoom=1 + scale_fraction,
                mode="bilinear",
                padding_mode="edge",
                keep_size=True,
            ),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def train_augmentation(augment: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`build_augmentation` from a config node such as ``cfg.data.augment``."""
    return build_augmentation(
        rotate_degrees=float(augment["rotate_degrees"]),
        translate_fraction=float(augment["translate_fraction"]),
        scale_fraction=float(augment["scale_fraction"]),
        prob=float(augment["prob"]),
    )
