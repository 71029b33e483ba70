"""Read one image file: first its header (:func:`open_image`), then, if wanted, its pixels.

Reading never decides whether an image is usable (see ``pipeline.acceptance``); it only
fails, with :class:`UnreadableImage`, when the file cannot be read or decoded at all. The
split into header and pixels lets preprocessing reject a file (a CT, a 50-megapixel
image, a multi-frame object) without ever decoding it.

Supported: DICOM in every transfer syntax an installed pydicom decoder handles
(uncompressed little/big endian, deflated, RLE, JPEG baseline / extended / lossless,
JPEG-LS, JPEG 2000, HTJ2K), PNG / JPEG (Pillow, as grayscale) and NIfTI (2-D, or the
middle axial slice of a volume, reoriented to radiological display).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

PIXEL_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DICOMDIR_REASON = "DICOMDIR (a media directory index, not an image)"
NOT_IMAGE_REASON = "not an image file (unknown suffix, no DICM preamble)"
# Transfer syntaxes whose PixelData, once read, is plain little-endian samples.
NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


class UnreadableImage(Exception):
    """The file is not an image fedrad can decode; ``str(error)`` is the report reason."""


@dataclass
class LoadedImage:
    """Stored pixel values (H, W), metadata, and the DICOM header (None for other formats)."""

    pixels: np.ndarray
    meta: dict[str, Any]
    dicom: Dataset | None = field(default=None, repr=False)


@dataclass
class SourceImage:
    """A file whose header has been read; :meth:`decode` reads its pixels (first frame)."""

    meta: dict[str, Any]
    dicom: Dataset | None
    _pixels: Callable[[], np.ndarray] = field(repr=False)

    def decode(self) -> LoadedImage:
        """Decode the pixels; raise UnreadableImage when the decoder fails."""
        pixels = self._pixels()
        if self.dicom is not None and "PixelData" in self.dicom:
            del self.dicom.PixelData  # the header stays; the bytes are no longer needed
        return LoadedImage(pixels=pixels, meta=self.meta, dicom=self.dicom)


def special_file_reason(path: Path) -> str | None:
    """Why a directory entry cannot be read as a file (broken link, FIFO, ...), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "unreadable: broken symbolic link (its target does not exist)"
    except OSError as error:
        return f"unreadable: {type(error).__name__} ({error.strerror})"
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        return f"unreadable: not a regular file ({kind})"
    if not os.access(path, os.R_OK):
        return "unreadable: no read permission"
    return None


def image_format(path: Path, head: bytes | None = None) -> str | None:
    """``dicom``, ``pixel`` (PNG/JPEG), ``nifti`` or None when the file is not an image.

    Files without a known suffix count as DICOM when they carry the ``DICM`` preamble
    (``head``: the file's first 132 bytes, read from ``path`` when not given).
    A file named DICOMDIR is never an image (see :func:`not_image_reason`).
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
    if head is None:
        with open(path, "rb") as handle:
            head = handle.read(132)
    return "dicom" if head[128:132] == b"DICM" else None


def not_image_reason(path: Path) -> str:
    """The report reason for a file :func:`image_format` does not take."""
    return DICOMDIR_REASON if path.name.lower() == "dicomdir" else NOT_IMAGE_REASON


def open_image(path: str | Path, data: bytes | None = None) -> SourceImage:
    """Read the header of ``path`` (from ``data``, its bytes, when given) without decoding."""
    path = Path(path)
    kind = image_format(path, data[:132] if data is not None else None)
    if kind == "dicom":
        return open_dicom(path, data)
    if kind == "pixel":
        return open_pixel_image(path, data)
    if kind == "nifti":
        return open_nifti(path)  # nibabel reads the file itself
    raise UnreadableImage(not_image_reason(path))


def read_image(path: str | Path) -> LoadedImage:
    """Header and pixels of ``path`` (first frame of a multi-frame DICOM)."""
    return open_image(path).decode()


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


def _uid_name(value: Any) -> str:
    return UID(str(value)).name if value else "unknown SOP class"


def dicom_meta(ds: Dataset) -> dict[str, Any]:
    """The header fields acceptance and the manifest use (identifiers kept for site-only use)."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value).strip().upper() if value not in (None, "") else None

    syntax = ds.file_meta.get("TransferSyntaxUID")
    return {
        "format": "dicom",
        "modality": text("Modality"),
        "body_part": text("BodyPartExamined"),
        "view": text("ViewPosition"),
        "photometric": text("PhotometricInterpretation"),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
        "bits_stored": int(ds.get("BitsStored", 0) or 0) or None,
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "pixel_spacing_mm": _spacing(ds),
        "transfer_syntax": str(syntax) if syntax else None,
        "number_of_frames": int(ds.get("NumberOfFrames", 1) or 1),
        "sop_class": _uid_name(ds.get("SOPClassUID")),
        "patient_id": str(ds.get("PatientID", "")).strip() or None,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")).strip() or None,
    }


def _parse_dicom(path: Path, data: bytes | None) -> Dataset:
    """dcmread, turning pydicom's end-of-file warnings into a 'truncated' error."""
    source = io.BytesIO(data) if data is not None else path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError as error:
            raise UnreadableImage("not a DICOM file (no 'DICM' prefix or File Meta Information header)") from error
        except (EOFError, OSError, ValueError, KeyError, TypeError) as error:
            raise UnreadableImage(f"unreadable DICOM ({type(error).__name__}: {error})"[:200]) from error
    ended = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if ended:
        raise UnreadableImage(f"truncated file: {ended[0].split(' in file')[0]}")
    return ds


@lru_cache(maxsize=64)
def _decoder_problem(syntax: str | None) -> str | None:
    """Why pixel data in transfer syntax ``syntax`` cannot be decoded here, or None."""
    if not syntax:
        return None
    name = UID(syntax).name
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax {name} ({syntax}): no pydicom decoder exists for it"
    if not decoder.is_available:
        return (f"unsupported transfer syntax {name} ({syntax}): no decoder plugin installed "
                f"(see pydicom's pixel data handler table)")
    return None


def native_pixels(ds: Dataset, meta: dict[str, Any]) -> np.ndarray | None:
    """Single-frame, uncompressed little-endian grayscale pixels read straight from the buffer.

    The same values as ``ds.pixel_array`` (masked to BitsStored, sign-extended per
    PixelRepresentation) without pydicom's general decoding machinery, which dominates the
    cost of small uncompressed images. None for anything else, or when the buffer is short
    (pydicom's decoder then reports the problem).
    """
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    if (meta["transfer_syntax"] not in NATIVE_LITTLE_ENDIAN or meta["samples_per_pixel"] != 1
            or meta["number_of_frames"] != 1 or allocated not in (8, 16)):
        return None
    signed = meta["pixel_representation"] == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = meta["rows"] * meta["cols"]
    buffer = ds.PixelData
    if len(buffer) < count * dtype.itemsize:
        return None
    array = np.frombuffer(buffer, dtype, count).reshape(meta["rows"], meta["cols"])
    bits = meta["bits_stored"] or allocated
    if bits < allocated:
        shift = allocated - bits
        array = (array << shift) >> shift if signed else array & ((1 << bits) - 1)
    return array


def open_dicom(path: Path, data: bytes | None = None) -> SourceImage:
    """A DICOM file's header; its pixels (first frame) decode on demand."""
    ds = _parse_dicom(path, data)
    if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage \
            or "DirectoryRecordSequence" in ds:
        raise UnreadableImage(DICOMDIR_REASON)
    meta = dicom_meta(ds)
    if "PixelData" not in ds:
        what = f"{meta['sop_class']}, Modality {meta['modality'] or 'missing'}"
        if meta["rows"]:
            raise UnreadableImage(f"missing PixelData ({what}, {meta['rows']}x{meta['cols']}): "
                                  "an incomplete image object")
        raise UnreadableImage(f"no pixel data ({what}): not an image")
    problem = _decoder_problem(meta["transfer_syntax"])
    if problem:
        raise UnreadableImage(problem)

    def pixels() -> np.ndarray:
        if meta["photometric"] not in MONOCHROME:
            raise UnreadableImage(f"PhotometricInterpretation {meta['photometric']!r} not in {list(MONOCHROME)}")
        array = native_pixels(ds, meta)
        if array is not None:
            return array
        try:
            if meta["number_of_frames"] > 1:
                ds.pixel_array_options(index=0)  # decode the first frame only
            array = ds.pixel_array
        except Exception as error:  # decoders raise many types; all mean "cannot decode"
            raise UnreadableImage(
                f"pixel data not decodable ({type(error).__name__}: {str(error)[:160]}; "
                f"transfer syntax {UID(meta['transfer_syntax'] or '').name})"
            ) from error
        return np.asarray(array[0] if array.ndim == 3 else array)

    return SourceImage(meta=meta, dicom=ds, _pixels=pixels)


def _plain_meta(kind: str, shape: tuple[int, ...], bits: int | None) -> dict[str, Any]:
    return {
        "format": kind, "modality": None, "body_part": None, "view": None,
        "photometric": "MONOCHROME2", "samples_per_pixel": 1, "rows": int(shape[0]),
        "cols": int(shape[1]), "bits_stored": bits, "pixel_representation": 0,
        "pixel_spacing_mm": None, "transfer_syntax": None, "number_of_frames": 1,
        "sop_class": None, "patient_id": None, "sop_instance_uid": None,
    }


def open_pixel_image(path: Path, data: bytes | None = None) -> SourceImage:
    """PNG / JPEG header (size, bit depth); pixels decode as grayscale (ITU-R 601-2 luma)."""
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"unreadable image ({type(error).__name__})") from error
    bits = 16 if image.mode.startswith("I;16") or image.mode == "I" else 8
    meta = _plain_meta("pixel", (image.height, image.width), bits)

    def pixels() -> np.ndarray:
        try:
            with image:
                image.load()
                gray = image if image.mode in ("L", "I", "I;16") else image.convert("L")
                return np.asarray(gray)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImage(f"unreadable image ({type(error).__name__})") from error

    return SourceImage(meta=meta, dicom=None, _pixels=pixels)


def radiological_plane(plane: np.ndarray) -> np.ndarray:
    """A plane of a RAS+ array (axes u < v) -> display orientation.

    Rows run along the higher anatomical axis from its + end (superior or anterior at the
    top); columns run along the lower axis from its + end (the patient's right on the
    image's left, as on a PA radiograph viewed in the usual way).
    """
    return np.ascontiguousarray(plane.T[::-1, ::-1])


def open_nifti(path: Path) -> SourceImage:
    """NIfTI header; pixels: the image reoriented to RAS+ and then to display orientation.

    A 2-D image (or a volume with one singleton axis) is that plane; a volume gives its
    middle axial slice (middle of the superior axis).
    """
    import nibabel

    try:
        image = nibabel.load(str(path))
        canonical = nibabel.as_closest_canonical(image)
    except Exception as error:  # nibabel raises several unrelated types for corrupt files
        raise UnreadableImage(f"unreadable NIfTI ({type(error).__name__})") from error
    if any(n > 1 for n in canonical.shape[3:]):
        raise UnreadableImage(f"NIfTI with unsupported shape {canonical.shape} (time series or vectors)")
    shape = tuple(canonical.shape[:3]) + (1,) * (3 - len(canonical.shape[:3]))
    singleton = [axis for axis, n in enumerate(shape) if n == 1]
    drop = singleton[0] if singleton else len(shape) - 1
    plane_shape = tuple(n for axis, n in enumerate(shape) if axis != drop)
    if len(plane_shape) != 2:
        raise UnreadableImage(f"NIfTI with unsupported shape {canonical.shape}")
    bits = np.dtype(canonical.get_data_dtype()).itemsize * 8
    meta = _plain_meta("nifti", radiological_plane(np.empty(plane_shape)).shape, bits)
    zooms = [z for axis, z in enumerate(canonical.header.get_zooms()[:3]) if axis != drop]
    meta["pixel_spacing_mm"] = float(zooms[-1]) if zooms and zooms[-1] > 0 else None

    def pixels() -> np.ndarray:
        try:
            volume = np.asarray(canonical.dataobj).reshape(shape)
        except Exception as error:  # truncated or corrupt data block
            raise UnreadableImage(f"unreadable NIfTI data ({type(error).__name__})") from error
        index = [slice(None)] * 3
        index[drop] = 0 if singleton else shape[drop] // 2
        return radiological_plane(volume[tuple(index)])

    return SourceImage(meta=meta, dicom=None, _pixels=pixels)
