"""Read one image file into stored pixel values plus a small metadata dictionary.

Reading never decides whether an image is usable (see ``pipeline.acceptance``); it only
fails, with :class:`UnreadableImage`, when the file cannot be decoded at all.
Supported: DICOM (any transfer syntax pydicom's pylibjpeg plugins decode, including
JPEG 2000 and JPEG baseline), PNG / JPEG (Pillow, as grayscale) and NIfTI (2-D or the
middle slice of a volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

PIXEL_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


class UnreadableImage(Exception):
    """The file is not an image fedrad can decode; ``str(error)`` is the report reason."""


@dataclass
class LoadedImage:
    """Stored pixel values (H, W), metadata, and the DICOM header (None for other formats)."""

    pixels: np.ndarray
    meta: dict[str, Any]
    dicom: Dataset | None = field(default=None, repr=False)


def image_format(path: Path) -> str | None:
    """``dicom``, ``pixel`` (PNG/JPEG), ``nifti`` or None when the file is not an image.

    Files without a known suffix count as DICOM when they carry the ``DICM`` preamble.
    """
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(PIXEL_SUFFIXES):
        return "pixel"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name == "dicomdir":
        return None
    with open(path, "rb") as handle:
        return "dicom" if handle.read(132)[128:] == b"DICM" else None


def read_image(path: Path) -> LoadedImage:
    """Read ``path`` according to :func:`image_format`; raise UnreadableImage otherwise."""
    kind = image_format(path)
    if kind == "dicom":
        return read_dicom(path)
    if kind == "pixel":
        return read_pixel_image(path)
    if kind == "nifti":
        return read_nifti(path)
    raise UnreadableImage("not an image file (unknown suffix, no DICM preamble)")


def _spacing(ds: Dataset) -> float | None:
    """Row spacing in mm from PixelSpacing or ImagerPixelSpacing; None when absent or zero."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value:
            try:
                spacing = float(value[0])
            except (TypeError, ValueError, IndexError):
                continue
            if spacing > 0:
                return spacing
    return None


def dicom_meta(ds: Dataset) -> dict[str, Any]:
    """The header fields acceptance and the manifest use (identifiers kept for site-only use)."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value).strip().upper() if value not in (None, "") else None

    return {
        "format": "dicom",
        "modality": text("Modality"),
        "body_part": text("BodyPartExamined"),
        "view": text("ViewPosition"),
        "photometric": text("PhotometricInterpretation"),
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
        "bits_stored": int(ds.get("BitsStored", 0) or 0) or None,
        "pixel_spacing_mm": _spacing(ds),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        "number_of_frames": int(ds.get("NumberOfFrames", 1) or 1),
        "patient_id": str(ds.get("PatientID", "")).strip() or None,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")) or None,
    }


def read_dicom(path: Path) -> LoadedImage:
    """Decode a DICOM file's first frame; the header (without pixel data) is kept."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError) as error:
        raise UnreadableImage(f"unreadable DICOM ({type(error).__name__})") from error
    if "PixelData" not in ds:
        raise UnreadableImage("DICOM without PixelData")
    meta = dicom_meta(ds)
    if meta["photometric"] not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadableImage(f"unsupported PhotometricInterpretation {meta['photometric']!r}")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # decoders raise many types; all mean "cannot decode"
        syntax = meta["transfer_syntax"]
        raise UnreadableImage(
            f"pixel data not decodable ({type(error).__name__}, transfer syntax {syntax})"
        ) from error
    if pixels.ndim == 3:
        pixels = pixels[0]
    del ds.PixelData
    return LoadedImage(pixels=np.asarray(pixels), meta=meta, dicom=ds)


def _plain_meta(kind: str, shape: tuple[int, int], bits: int | None) -> dict[str, Any]:
    return {
        "format": kind, "modality": None, "body_part": None, "view": None,
        "photometric": "MONOCHROME2", "rows": shape[0], "cols": shape[1],
        "bits_stored": bits, "pixel_spacing_mm": None, "transfer_syntax": None,
        "number_of_frames": 1, "patient_id": None, "sop_instance_uid": None,
    }


def read_pixel_image(path: Path) -> LoadedImage:
    """PNG / JPEG as grayscale (ITU-R 601-2 luma for colour files)."""
    try:
        with Image.open(path) as image:
            image.load()
            bits = 16 if image.mode.startswith("I;16") or image.mode == "I" else 8
            gray = image if image.mode in ("L", "I", "I;16") else image.convert("L")
            pixels = np.asarray(gray)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"unreadable image ({type(error).__name__})") from error
    return LoadedImage(pixels=pixels, meta=_plain_meta("pixel", pixels.shape, bits))


def read_nifti(path: Path) -> LoadedImage:
    """NIfTI: a 2-D image, or the middle slice along the last axis of a volume."""
    import nibabel

    try:
        volume = np.asarray(nibabel.load(str(path)).dataobj)
    except Exception as error:  # nibabel raises several unrelated types for corrupt files
        raise UnreadableImage(f"unreadable NIfTI ({type(error).__name__})") from error
    volume = np.squeeze(volume)
    if volume.ndim == 3:
        volume = volume[..., volume.shape[-1] // 2]
    if volume.ndim != 2:
        raise UnreadableImage(f"NIfTI with unsupported shape {volume.shape}")
    return LoadedImage(pixels=volume, meta=_plain_meta("nifti", volume.shape, None))
