"""DICOM pixel transforms: stored values -> display-ready intensities in [0, 1].

Each transform does one job on a dictionary ``{"image": ndarray (H, W), "dicom": Dataset | None}``
(``dicom`` is None for non-DICOM images, which every DICOM-specific step passes through
unchanged) and returns the same dictionary with a new ``image``. The order matters and is
fixed by :func:`dicom_to_unit`: modality LUT, VOI LUT / window, scale to [0, 1], MONOCHROME1
inversion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import Compose, Transform
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

Sample = dict[str, Any]


class ModalityLUT(Transform):
    """Stored values -> modality values (Rescale Slope/Intercept or Modality LUT Sequence).

    Input: ``image`` with the stored pixel values. Output: float64 ``image`` in modality units.
    """

    def __call__(self, data: Sample) -> Sample:
        ds: Dataset | None = data["dicom"]
        if ds is None:
            return data
        return {**data, "image": np.asarray(apply_modality_lut(data["image"], ds), np.float64)}


class VOILUT(Transform):
    """Modality values -> the first VOI view (VOI LUT Sequence or Window Center/Width).

    Input: ``image`` in modality units. Output: float64 ``image`` in the window's output range.
    Without any VOI information the image passes through unchanged, so the following
    :class:`ScaleToUnit` falls back to the image's own min-max range.
    """

    def __call__(self, data: Sample) -> Sample:
        ds: Dataset | None = data["dicom"]
        if ds is None:
            return data
        return {**data, "image": np.asarray(apply_voi_lut(data["image"], ds), np.float64)}


class ScaleToUnit(Transform):
    """Min-max scale ``image`` to float32 [0, 1]; a constant image becomes all zeros."""

    def __call__(self, data: Sample) -> Sample:
        image = np.asarray(data["image"], np.float64)
        low, high = float(image.min()), float(image.max())
        scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
        return {**data, "image": scaled.astype(np.float32)}


class InvertMonochrome1(Transform):
    """Invert MONOCHROME1 images (low values are white) so bright always means dense.

    Input: ``image`` in [0, 1]. Output: ``1 - image`` for MONOCHROME1, else unchanged.
    """

    def __call__(self, data: Sample) -> Sample:
        ds: Dataset | None = data["dicom"]
        if ds is None or ds.get("PhotometricInterpretation") != "MONOCHROME1":
            return data
        return {**data, "image": (1.0 - data["image"]).astype(np.float32)}


def dicom_pipeline() -> Compose:
    """The composed transform: modality LUT -> VOI LUT -> [0, 1] -> MONOCHROME1 inversion."""
    return Compose([ModalityLUT(), VOILUT(), ScaleToUnit(), InvertMonochrome1()])


def dicom_to_unit(image: np.ndarray, dataset: Dataset | None) -> np.ndarray:
    """Stored pixel values (H, W) -> float32 (H, W) in [0, 1], bright = dense."""
    return dicom_pipeline()({"image": image, "dicom": dataset})["image"]
