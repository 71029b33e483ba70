"""Read one image file: first its header (:func:`open_image`), then, if wanted, its pixels.

Reading never decides whether an image is usable (see ``pipeline.ingestion.acceptance``); it only
fails, with :class:`UnreadableImage`, when the file cannot be read or decoded at all. The
split into header and pixels lets preprocessing reject a file (a CT, a 50-megapixel
image, a multi-frame object) without ever decoding it.

Files may be hostile, so a DICOM header is checked before anything trusts it, each
failure an :class:`UnreadableImage` whose reason names the tag:

- values that do not parse (NumberOfFrames ``x1``, RescaleSlope ``abc``), non-finite
  rescale or window values, RescaleSlope 0 and WindowWidth below 1 (0 for LINEAR_EXACT /
  SIGMOID windows): the values that are used, i.e. rescale unless a Modality LUT Sequence
  is present, the first window unless a VOI LUT Sequence is present;
- an inconsistent pixel module: BitsAllocated not 8, 16 or 32, BitsStored 0 or above
  BitsAllocated, HighBit not BitsStored - 1, PixelRepresentation not 0 or 1;
- at decode time, native PixelData shorter than Rows x Columns x SamplesPerPixel x
  BitsAllocated / 8 x frames, and an encapsulated codestream whose own header
  (``pipeline.ingestion.codestream``) declares another size or sample count than Rows / Columns /
  SamplesPerPixel (so the header's max_pixels check bounds what the decoder allocates).

Memory cap: ``max_bytes`` (``open_image``) bounds the file size, a deflated dataset's
inflated size (checked with a bounded inflate before pydicom inflates it) and the
estimated working memory of decoding and transforming the first frame
(:data:`DECODE_BYTES_PER_SAMPLE` per sample, from the header, checked before decoding).
This is a check before allocating, not an rlimit: ``RLIMIT_AS`` would cap the whole
process (preprocessing also runs in-process, and torch reserves large address ranges),
while the decoders allocate from the codestream's declared size, which must equal the
checked header.

Supported: DICOM in every transfer syntax an installed pydicom decoder handles
(uncompressed little/big endian, deflated, RLE, JPEG baseline / extended / lossless,
JPEG-LS, JPEG 2000, HTJ2K), PNG / JPEG (Pillow, as grayscale) and NIfTI (2-D, or the
middle axial slice of a volume, reoriented to radiological display).
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    MediaStorageDirectoryStorage,
)

from pipeline.ingestion.codestream import CodestreamError, DeclaredSize, declared_size
from pipeline.ingestion.header import HeaderFacts

PIXEL_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DICOMDIR_REASON = "DICOMDIR (a media directory index, not an image)"
NOT_IMAGE_REASON = "not an image file (unknown suffix, no DICM preamble)"
# Transfer syntaxes whose PixelData, once read, is plain little-endian samples.
NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
BITS_ALLOCATED = (8, 16, 32)
# Estimated peak memory per sample of decoding the first frame and transforming it to
# [0, 1] (decoder buffers, the stored array, float copies); measured 7-15 on real CRs.
DECODE_BYTES_PER_SAMPLE = 16
DEFAULT_MAX_BYTES = 1 << 30
MB = 1 << 20
# How much of an encapsulated frame is searched for its codestream header.
CODESTREAM_HEADER_BYTES = 1 << 20


class UnreadableImage(Exception):
    """The file is not an image fedrad can decode; ``str(error)`` is the report reason."""


@dataclass
class LoadedImage:
    """Stored pixel values (H, W), header facts, and the DICOM header (None for other formats)."""

    pixels: np.ndarray
    header: HeaderFacts
    dicom: Dataset | None = field(default=None, repr=False)


@dataclass
class SourceImage:
    """A file whose header has been read; :meth:`decode` reads its pixels (first frame).

    ``decode_bytes``: estimated memory decoding and transforming the pixels takes;
    ``max_bytes``: the cap :meth:`decode` checks it against (None: no cap).
    """

    header: HeaderFacts
    dicom: Dataset | None
    _pixels: Callable[[], np.ndarray] = field(repr=False)
    decode_bytes: int = 0
    max_bytes: int | None = None

    def decode(self) -> LoadedImage:
        """Decode the pixels; raise UnreadableImage when the decoder fails or would exceed the cap."""
        if self.max_bytes is not None and self.decode_bytes > self.max_bytes:
            raise UnreadableImage(
                f"decoding would need about {self.decode_bytes / MB:.0f} MB "
                f"({self.header.rows}x{self.header.cols}, {DECODE_BYTES_PER_SAMPLE} bytes per sample), "
                f"above max_decode_mb {self.max_bytes / MB:.0f} (checked before decoding)"
            )
        pixels = self._pixels()
        if self.dicom is not None and "PixelData" in self.dicom:
            del self.dicom.PixelData  # the header stays; the bytes are no longer needed
        return LoadedImage(pixels=pixels, header=self.header, dicom=self.dicom)


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


def open_image(
    path: str | Path,
    data: bytes | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> SourceImage:
    """Read the header of ``path`` (from ``data``, its bytes, when given) without decoding.

    ``max_bytes`` caps the memory reading and decoding may take (see the module docstring).
    """
    path = Path(path)
    kind = image_format(path, data[:132] if data is not None else None)
    if kind == "dicom":
        source = open_dicom(path, data, max_bytes)
    elif kind == "pixel":
        source = open_pixel_image(path, data)
    elif kind == "nifti":
        source = open_nifti(path)  # nibabel reads the file itself
    else:
        raise UnreadableImage(not_image_reason(path))
    source.max_bytes = max_bytes
    return source


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
            if math.isfinite(spacing) and spacing > 0:
                return spacing
    return None


def _uid_name(value: Any) -> str:
    return UID(str(value)).name if value else "unknown SOP class"


def _tag(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` (None when absent or empty); a value pydicom cannot convert is a rejection."""
    try:
        value = ds.get(keyword)
    except Exception as error:  # pydicom converts lazily; a malformed value raises on access
        raise UnreadableImage(f"{keyword} unreadable ({type(error).__name__})") from error
    return None if value is None or value == "" else value


def _shown(value: Any) -> str:
    return repr(str(value))[:40]


def int_tag(ds: Dataset, keyword: str, default: int) -> int:
    """``keyword`` as one integer (``default`` when absent or 0 where ``default`` is not 0)."""
    value = _tag(ds, keyword)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise UnreadableImage(f"{keyword} {_shown(value)} is not an integer") from None
    if number < 0:
        raise UnreadableImage(f"{keyword} {number} is negative")
    return number or default


def float_tag(ds: Dataset, keyword: str) -> float | None:
    """The first value of ``keyword`` as a finite number (None when absent)."""
    value = _tag(ds, keyword)
    if value is None:
        return None
    first = value[0] if isinstance(value, (list, tuple, MultiValue)) and len(value) else value
    try:
        number = float(first)
    except (TypeError, ValueError, OverflowError):
        raise UnreadableImage(f"{keyword} {_shown(first)} is not a number") from None
    if not math.isfinite(number):
        raise UnreadableImage(f"{keyword} {_shown(first)} is not a finite number")
    return number


def dicom_header(ds: Dataset) -> HeaderFacts:
    """The header fields acceptance and the manifest use (identifiers kept for site-only use).

    Raises UnreadableImage, naming the tag, for a value that does not parse.
    """

    def text(keyword: str) -> str | None:
        value = _tag(ds, keyword)
        return str(value).strip().upper() if value is not None else None

    def descriptive(keyword: str) -> str | None:
        """A tag kept only as a coarse category: a malformed one is unknown, not a rejection."""
        try:
            return text(keyword)
        except UnreadableImage:
            return None

    syntax = ds.file_meta.get("TransferSyntaxUID")
    return HeaderFacts(
        format="dicom",
        modality=text("Modality"),
        body_part=text("BodyPartExamined"),
        view=text("ViewPosition"),
        photometric=text("PhotometricInterpretation"),
        samples_per_pixel=int_tag(ds, "SamplesPerPixel", 1),
        rows=int_tag(ds, "Rows", 0),
        cols=int_tag(ds, "Columns", 0),
        bits_stored=int_tag(ds, "BitsStored", 0) or None,
        pixel_representation=int_tag(ds, "PixelRepresentation", 0),
        pixel_spacing_mm=_spacing(ds),
        transfer_syntax=str(syntax) if syntax else None,
        number_of_frames=int_tag(ds, "NumberOfFrames", 1),
        sop_class=_uid_name(ds.get("SOPClassUID")),
        patient_id=str(ds.get("PatientID", "")).strip() or None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip() or None,
        sex=descriptive("PatientSex"),
        age=descriptive("PatientAge"),
        manufacturer=descriptive("Manufacturer"),
    )


def _deflated_start(data: bytes) -> int | None:
    """Where the deflated dataset starts in ``data`` (after the File Meta Information), or
    None when the transfer syntax is not deflate or the meta information does not parse."""
    if data[128:132] != b"DICM":
        return None
    handle = io.BytesIO(data)
    handle.seek(132)
    syntax = b""
    try:
        for element in data_element_generator(
            handle, False, True, stop_when=lambda tag, vr, n: tag.group != 2
        ):
            if element.tag == 0x00020010:
                if element.value is None:  # a transfer syntax without a value: malformed
                    return None
                syntax = bytes(element.value).rstrip(b"\0 ")
    except Exception:  # malformed meta information: pydicom reports it when it parses the file
        return None
    return handle.tell() if syntax == str(DeflatedExplicitVRLittleEndian).encode() else None


def _check_inflated_size(data: bytes, max_bytes: int) -> None:
    """Reject a deflated dataset that inflates beyond ``max_bytes`` before pydicom inflates all of it."""
    start = _deflated_start(data)
    if start is None:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[start:], max_bytes)
    except zlib.error:
        return  # pydicom reports the corrupt stream
    if inflater.unconsumed_tail:
        raise UnreadableImage(
            f"deflated dataset inflates to more than max_decode_mb {max_bytes / MB:.0f} "
            "(a decompression bomb?); checked before inflating it"
        )


def _parse_dicom(path: Path, data: bytes | None, max_bytes: int | None = None) -> Dataset:
    """dcmread, turning pydicom's end-of-file warnings into a 'truncated' error."""
    if data is not None and max_bytes is not None:
        _check_inflated_size(data, max_bytes)
    source = io.BytesIO(data) if data is not None else path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError as error:
            raise UnreadableImage(
                "not a DICOM file (no 'DICM' prefix or File Meta Information header)"
            ) from error
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
        return (
            f"unsupported transfer syntax {name} ({syntax}): no decoder plugin installed "
            f"(see pydicom's pixel data handler table)"
        )
    return None


def pixel_module_problem(ds: Dataset, header: HeaderFacts) -> str | None:
    """Why the Image Pixel module's attributes contradict each other, or None.

    HighBit must be BitsStored - 1 (PS3.5 8.1.1; every real file checked is so). Absent
    BitsStored / HighBit / PixelRepresentation are left to the decoder, as before.
    """
    allocated = int_tag(ds, "BitsAllocated", 0)
    stored = header.bits_stored
    high_bit = _tag(ds, "HighBit")
    if not allocated:
        return "BitsAllocated missing"
    if allocated not in BITS_ALLOCATED:
        return f"BitsAllocated {allocated} not in {list(BITS_ALLOCATED)}"
    if _tag(ds, "BitsStored") is not None and not stored:
        return "BitsStored 0"
    if stored and stored > allocated:
        return f"BitsStored {stored} exceeds BitsAllocated {allocated}"
    if stored and high_bit is not None and int_tag(ds, "HighBit", 0) != stored - 1:
        return f"HighBit {high_bit} is not BitsStored - 1 ({stored - 1})"
    if header.pixel_representation not in (0, 1):
        return f"PixelRepresentation {header.pixel_representation} not in [0, 1]"
    return None


def lut_value_problem(ds: Dataset) -> str | None:
    """Why the rescale or window values the transforms would use are unusable, or None.

    Values that do not parse or are not finite raise (see :func:`float_tag`); RescaleSlope
    0 would make every pixel one value; WindowWidth must be at least 1 for a LINEAR window
    and above 0 otherwise (PS3.3 C.11.2.1.2). A window that is finite but far outside the
    image's values is not rejected: ``transforms.dicom.VOILUT`` falls back to the image's
    own range then.
    """
    if "ModalityLUTSequence" not in ds:
        slope = float_tag(ds, "RescaleSlope")
        float_tag(ds, "RescaleIntercept")
        if slope == 0:
            return "RescaleSlope 0 maps every pixel to one value"
    if "VOILUTSequence" not in ds:
        float_tag(ds, "WindowCenter")
        width = float_tag(ds, "WindowWidth")
        function = str(_tag(ds, "VOILUTFunction") or "LINEAR").strip().upper()
        linear = function == "LINEAR"
        if width is not None and (width < 1 if linear else width <= 0):
            needs = "at least 1" if linear else "more than 0"
            return f"WindowWidth {width:g}: a {function} window needs {needs}"
    return None


def _codestream_kind(syntax: str | None) -> str | None:
    if syntax in JPEG2000TransferSyntaxes:
        return "jpeg2000"
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        return "jpeg"
    return None


def codestream_size(pixel_data: bytes, kind: str) -> DeclaredSize:
    """The size the first frame's codestream declares, read from the first fragments of
    the encapsulated ``pixel_data`` (up to CODESTREAM_HEADER_BYTES) without decoding."""
    head = b""
    try:
        items = generate_fragments(pixel_data)
        next(items, None)  # the Basic Offset Table
        for fragment in items:
            head += fragment[: CODESTREAM_HEADER_BYTES - len(head)]
            found = declared_size(head, kind)
            if found is not None:
                return found
            if len(head) >= CODESTREAM_HEADER_BYTES:
                break
    except CodestreamError as error:
        raise UnreadableImage(f"{error} (checked before decoding)") from error
    except Exception as error:  # a malformed item structure
        raise UnreadableImage(
            f"encapsulated PixelData unreadable ({type(error).__name__}: {str(error)[:120]})"
        ) from error
    raise UnreadableImage("no complete codestream header in the first fragments of PixelData")


def check_codestream(ds: Dataset, header: HeaderFacts) -> None:
    """Reject an encapsulated frame whose codestream declares another size than the header."""
    kind = _codestream_kind(header.transfer_syntax)
    if kind is None:
        return  # RLE: the decoder sizes its output from Rows / Columns
    found = codestream_size(ds.PixelData, kind)
    declared = (found.rows, found.cols, found.components)
    expected = (header.rows, header.cols, header.samples_per_pixel)
    if declared != expected:
        raise UnreadableImage(
            f"{found.kind} codestream declares {found.rows}x{found.cols} with {found.components} "
            f"component(s) but the header says {header.rows}x{header.cols} (Rows x Columns) with "
            f"SamplesPerPixel {header.samples_per_pixel}: rejected before decoding"
        )


def check_native_length(ds: Dataset, header: HeaderFacts) -> None:
    """Reject uncompressed PixelData shorter than the header's size needs."""
    allocated = int_tag(ds, "BitsAllocated", 0)
    frames = header.number_of_frames
    needed = header.rows * header.cols * header.samples_per_pixel * allocated // 8 * frames
    held = len(ds.PixelData)
    if held < needed:
        raise UnreadableImage(
            f"pixel data not decodable: PixelData holds {held} bytes, {header.rows}x{header.cols}x"
            f"{header.samples_per_pixel} samples of {allocated} bits x {frames} frame(s) need {needed} "
            "(truncated file or wrong header)"
        )


def native_pixels(ds: Dataset, header: HeaderFacts) -> np.ndarray | None:
    """Single-frame, uncompressed little-endian grayscale pixels read straight from the buffer.

    The same values as ``ds.pixel_array`` (masked to BitsStored, sign-extended per
    PixelRepresentation) without pydicom's general decoding machinery, which dominates the
    cost of small uncompressed images. None for anything else, or when the buffer is short
    (pydicom's decoder then reports the problem).
    """
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    if (
        header.transfer_syntax not in NATIVE_LITTLE_ENDIAN
        or header.samples_per_pixel != 1
        or header.number_of_frames != 1
        or allocated not in (8, 16)
    ):
        return None
    signed = header.pixel_representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = header.rows * header.cols
    buffer = ds.PixelData
    if len(buffer) < count * dtype.itemsize:
        return None
    array = np.frombuffer(buffer, dtype, count).reshape(header.rows, header.cols)
    bits = header.bits_stored or allocated
    if bits < allocated:
        shift = allocated - bits
        array = (array << shift) >> shift if signed else array & ((1 << bits) - 1)
    return array


def open_dicom(path: Path, data: bytes | None = None, max_bytes: int | None = None) -> SourceImage:
    """A DICOM file's header, checked (see the module docstring); its pixels (first frame)
    decode on demand, after the PixelData has been checked against the header."""
    if data is None and max_bytes is not None:
        try:
            data = path.read_bytes()  # the inflated-size check needs the bytes
        except OSError as error:
            raise UnreadableImage(f"unreadable: {type(error).__name__} ({error.strerror})") from error
    ds = _parse_dicom(path, data, max_bytes)
    if (
        ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage
        or "DirectoryRecordSequence" in ds
    ):
        raise UnreadableImage(DICOMDIR_REASON)
    header = dicom_header(ds)
    if "PixelData" not in ds:
        what = f"{header.sop_class}, Modality {header.modality or 'missing'}"
        if header.rows:
            raise UnreadableImage(
                f"missing PixelData ({what}, {header.rows}x{header.cols}): an incomplete image object"
            )
        raise UnreadableImage(f"no pixel data ({what}): not an image")
    problem = (
        pixel_module_problem(ds, header) or lut_value_problem(ds) or _decoder_problem(header.transfer_syntax)
    )
    if problem:
        raise UnreadableImage(problem)
    syntax = header.transfer_syntax
    encapsulated = syntax is not None and UID(syntax).is_encapsulated

    def pixels() -> np.ndarray:
        if header.photometric not in MONOCHROME:
            raise UnreadableImage(
                f"PhotometricInterpretation {header.photometric!r} not in {list(MONOCHROME)}"
            )
        if encapsulated:
            check_codestream(ds, header)
        elif syntax is not None:
            check_native_length(ds, header)
        array = native_pixels(ds, header)
        if array is not None:
            return array
        try:
            if header.number_of_frames > 1:
                ds.pixel_array_options(index=0)  # decode the first frame only
            array = ds.pixel_array
        except Exception as error:  # decoders raise many types; all mean "cannot decode"
            raise UnreadableImage(
                f"pixel data not decodable ({type(error).__name__}: {str(error)[:160]}; "
                f"transfer syntax {UID(header.transfer_syntax or '').name})"
            ) from error
        return np.asarray(array[0] if array.ndim == 3 else array)

    samples = header.rows * header.cols * header.samples_per_pixel
    return SourceImage(
        header=header, dicom=ds, _pixels=pixels, decode_bytes=samples * DECODE_BYTES_PER_SAMPLE
    )


def _plain_header(kind: str, shape: tuple[int, ...], bits: int | None) -> HeaderFacts:
    return HeaderFacts(format=kind, rows=int(shape[0]), cols=int(shape[1]), bits_stored=bits)


def open_pixel_image(path: Path, data: bytes | None = None) -> SourceImage:
    """PNG / JPEG header (size, bit depth); pixels decode as grayscale (ITU-R 601-2 luma)."""
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"unreadable image ({type(error).__name__})") from error
    bits = 16 if image.mode.startswith("I;16") or image.mode == "I" else 8
    header = _plain_header("pixel", (image.height, image.width), bits)
    decode_bytes = image.height * image.width * DECODE_BYTES_PER_SAMPLE

    def pixels() -> np.ndarray:
        try:
            with image:
                image.load()
                gray = image if image.mode in ("L", "I", "I;16") else image.convert("L")
                return np.asarray(gray)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImage(f"unreadable image ({type(error).__name__})") from error

    return SourceImage(header=header, dicom=None, _pixels=pixels, decode_bytes=decode_bytes)


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
    zooms = [z for axis, z in enumerate(canonical.header.get_zooms()[:3]) if axis != drop]
    spacing = float(zooms[-1]) if zooms and zooms[-1] > 0 else None
    header = replace(
        _plain_header("nifti", radiological_plane(np.empty(plane_shape)).shape, bits),
        pixel_spacing_mm=spacing,
    )

    def pixels() -> np.ndarray:
        try:
            volume = np.asarray(canonical.dataobj).reshape(shape)
        except Exception as error:  # truncated or corrupt data block
            raise UnreadableImage(f"unreadable NIfTI data ({type(error).__name__})") from error
        index: list[slice | int] = [slice(None)] * 3
        index[drop] = 0 if singleton else shape[drop] // 2
        return radiological_plane(volume[tuple(index)])

    # The whole volume is read (as float64 when the header scales it), then one plane.
    decode_bytes = int(np.prod(shape)) * 8 + int(np.prod(plane_shape)) * DECODE_BYTES_PER_SAMPLE
    return SourceImage(header=header, dicom=None, _pixels=pixels, decode_bytes=decode_bytes)
