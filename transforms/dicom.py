"""DICOM pixel transforms: stored values -> display-ready intensities in [0, 1].

Each transform does one job on a dictionary ``{"image": ndarray (H, W), "dicom": Dataset | None}``
(``dicom`` is None for non-DICOM images, which every DICOM-specific step passes through
unchanged) and returns the same dictionary with a new ``image``. The order matters and is
fixed by :func:`dicom_to_unit`: modality LUT, VOI LUT / window, scale to [0, 1], MONOCHROME1
inversion.

Integer stored values (every DICOM radiograph: pydicom has already masked them to
BitsStored and sign-extended them per PixelRepresentation) go through the modality and VOI
steps as a lookup table over the image's value range: the same functions, evaluated once
per distinct value instead of once per pixel. When that table is affine,
:func:`dicom_to_unit_square` resizes the stored values first and maps only the small image.

VOI fallback: without a VOI LUT Sequence and without Window Center/Width, the image's own
min-max range of modality values is used. With several windows the first one is used.
The same fallback applies when the VOI LUT or window maps every pixel of an image that is
not constant to one value (a window far outside the image's values, such as
WindowCenter 1e99, or one too wide for float precision): training then sees the image's
own range instead of a blank image.

Hostile headers: a failure of pydicom's LUT functions (a malformed LUT Sequence, an
unknown VOI LUT Function, ...) and values that stop being finite (a huge rescale) raise
:class:`PixelTransformError`, whose message is a report reason. Values that do not parse,
a zero slope and a window width below the minimum are rejected from the header before
(``pipeline.ingestion.readers.lut_value_problem``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import Compose, Transform
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from transforms.image import resize_square

Sample = dict[str, Any]


class PixelTransformError(ValueError):
    """The header's LUT / rescale / window values cannot be applied; ``str(error)`` is the reason."""


def _applied(step: str, function: Any, image: np.ndarray, ds: Dataset) -> np.ndarray:
    """``function(image, ds)`` (a pydicom LUT function) as float64; its failures as PixelTransformError."""
    try:
        return np.asarray(function(image, ds), np.float64)
    except Exception as error:  # pydicom raises many types for malformed LUT attributes
        message = " ".join(str(error).split())[:160]
        raise PixelTransformError(f"{step} not applicable ({type(error).__name__}: {message})") from error


class ModalityLUT(Transform):
    """Stored values -> modality values (Rescale Slope/Intercept or Modality LUT Sequence).

    Input: ``image`` with the stored pixel values. Output: float64 ``image`` in modality units.
    """

    def __call__(self, data: Sample) -> Sample:
        ds: Dataset | None = data["dicom"]
        if ds is None:
            return data
        return {**data, "image": _applied("Modality LUT / rescale", apply_modality_lut, data["image"], ds)}


class VOILUT(Transform):
    """Modality values -> the first VOI view (VOI LUT Sequence or Window Center/Width).

    Input: ``image`` in modality units. Output: float64 ``image`` in the window's output range.
    Without any VOI information, or when the VOI view maps a non-constant image to a single
    value, the image passes through unchanged, so the following :class:`ScaleToUnit` falls
    back to the image's own min-max range.
    """

    def __call__(self, data: Sample) -> Sample:
        ds: Dataset | None = data["dicom"]
        if ds is None:
            return data
        image = data["image"]
        windowed = _applied("VOI LUT / window", apply_voi_lut, image, ds)
        if windowed.size and windowed.min() == windowed.max() and image.min() != image.max():
            return {**data, "image": np.asarray(image, np.float64)}
        return {**data, "image": windowed}


class ScaleToUnit(Transform):
    """Min-max scale ``image`` to float32 [0, 1]; a constant image becomes all zeros.

    Raises PixelTransformError when the values are not finite (a LUT overflowed float32).
    """

    def __call__(self, data: Sample) -> Sample:
        with np.errstate(over="ignore"):  # an overflow shows as inf below
            image = np.array(data["image"], np.float32)
        low, high = float(image.min()), float(image.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise PixelTransformError(
                "pixel values not finite after the Modality / VOI LUT "
                "(check RescaleSlope / RescaleIntercept and the window)"
            )
        if high > low:
            image -= low
            image *= 1.0 / (high - low)
        else:
            image[...] = 0.0
        return {**data, "image": np.clip(image, 0.0, 1.0, out=image)}


class InvertMonochrome1(Transform):
    """Invert MONOCHROME1 images (low values are white) so bright always means dense.

    Input: ``image`` in [0, 1]. Output: ``1 - image`` for MONOCHROME1, else unchanged.
    """

    def __call__(self, data: Sample) -> Sample:
        ds: Dataset | None = data["dicom"]
        if ds is None or ds.get("PhotometricInterpretation") != "MONOCHROME1":
            return data
        return {**data, "image": (1.0 - data["image"]).astype(np.float32)}


MAX_TABLE_ENTRIES = 1 << 17


def dicom_pipeline() -> Compose:
    """The composed transform: modality LUT -> VOI LUT -> [0, 1] -> MONOCHROME1 inversion."""
    return Compose([ModalityLUT(), VOILUT(), ScaleToUnit(), InvertMonochrome1()])


def unit_table(low: int, high: int, dtype: np.dtype, dataset: Dataset) -> np.ndarray | None:
    """Final [0, 1] value of every stored value ``low..high``, or None if the LUTs are not monotonic.

    Runs the four transforms on the table itself. An image whose stored values span exactly
    ``low..high`` has its modality/VOI minimum and maximum at those two ends when the LUTs are
    monotonic, so scaling the table equals scaling the image.
    """
    table = np.arange(low, high + 1, dtype=dtype)[None]
    values = VOILUT()(ModalityLUT()({"image": table, "dicom": dataset}))["image"][0]
    steps = np.diff(values)
    if not ((steps >= 0).all() or (steps <= 0).all()):
        return None
    return InvertMonochrome1()(ScaleToUnit()({"image": values, "dicom": dataset}))["image"]


def _image_table(image: np.ndarray, dataset: Dataset | None) -> tuple[np.ndarray, int] | None:
    """The :func:`unit_table` of an integer DICOM image's value range and its first value, or None."""
    if dataset is None or not np.issubdtype(image.dtype, np.integer) or not image.size:
        return None
    low, high = int(image.min()), int(image.max())
    if high - low >= MAX_TABLE_ENTRIES:
        return None
    table = unit_table(low, high, image.dtype, dataset)
    return None if table is None else (table, low)


def dicom_to_unit(image: np.ndarray, dataset: Dataset | None) -> np.ndarray:
    """Stored pixel values (H, W) -> float32 (H, W) in [0, 1], bright = dense.

    Integer images take the table path (:func:`unit_table`), which gives the same values as
    :func:`dicom_pipeline` with one lookup per pixel.
    """
    return _to_unit(image, dataset, _image_table(image, dataset))


def _to_unit(image: np.ndarray, dataset: Dataset | None, found: tuple[np.ndarray, int] | None) -> np.ndarray:
    """:func:`dicom_to_unit` given the image's table (``found``, from :func:`_image_table`)."""
    if found is None:
        return dicom_pipeline()({"image": image, "dicom": dataset})["image"]
    table, low = found
    return np.take(table, image - np.asarray(low, image.dtype) if low else image)


AFFINE_TOLERANCE = 1e-6  # in [0, 1] units: a few float32 roundings of the table
EXACT_FLOAT32 = 2**24  # integers of smaller magnitude are exact in float32


def _affine(table: np.ndarray, low: int) -> tuple[float, float] | None:
    """``(first value, step)`` when ``table[i] == first + i * step`` within AFFINE_TOLERANCE
    and the stored values ``low ..`` are exact in float32, else None."""
    if max(abs(low), abs(low + len(table) - 1)) >= EXACT_FLOAT32:
        return None
    step = float(table[-1] - table[0]) / (len(table) - 1) if len(table) > 1 else 0.0
    line = float(table[0]) + step * np.arange(len(table))
    return (float(table[0]), step) if np.abs(table - line).max() <= AFFINE_TOLERANCE else None


def dicom_to_unit_square(image: np.ndarray, dataset: Dataset | None, size: int) -> np.ndarray:
    """``resize_square(dicom_to_unit(image, dataset), size)``, without a lookup per source pixel
    when it can.

    When the composed LUTs are affine over the image's value range (rescale only, a window
    wider than the image, no VOI LUT curve), the stored values are resized first and the
    affine map is applied to the small image: area averaging commutes with an affine map, so
    only float32 rounding differs. Otherwise the full-size image is transformed first.
    """
    found = _image_table(image, dataset)
    line = None if found is None else _affine(*found)
    if found is None or line is None:
        return resize_square(_to_unit(image, dataset, found), size)
    first, step = line
    resized = resize_square(np.asarray(image, np.float32), size)
    resized -= found[1]
    resized *= step
    resized += first
    return np.clip(resized, 0.0, 1.0, out=resized)
