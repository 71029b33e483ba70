"""The image size a compressed codestream declares, read from its main header without decoding.

A decoder allocates its buffers from the codestream's own header, not from the DICOM
Rows / Columns, so a file whose header says 256x256 but whose JPEG 2000 codestream says
20000x20000 makes the decoder take gigabytes. :func:`declared_size` reads that size:

- JPEG 2000 / HTJ2K: the SIZ marker segment (``Xsiz - XOsiz`` columns, ``Ysiz - YOsiz`` rows,
  ``Csiz`` components), also inside a JP2 file's ``jp2c`` box;
- JPEG (ITU T.81) and JPEG-LS: the frame header of the first SOF marker (SOF0..SOF15 except
  DHT C4, JPG C8 and DAC CC; JPEG-LS SOF55 F7): ``Y`` rows, ``X`` columns, ``Nf`` components.

Both raise :class:`CodestreamError` for a malformed header and return None when ``data``
ends before the size is known (the caller may append the next fragment and retry).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

J2K_SOC = b"\xff\x4f"
J2K_SIZ = b"\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
JPEG_SOI = b"\xff\xd8"
# SOF markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC); JPEG-LS SOF55 (F7).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# Markers without a length field: TEM, RSTn, SOI, EOI.
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
SOS, EOI = 0xDA, 0xD9


class CodestreamError(ValueError):
    """The codestream's main header is malformed; ``str(error)`` says how."""


@dataclass(frozen=True)
class DeclaredSize:
    """What a codestream's main header declares: ``kind`` (``JPEG 2000`` or ``JPEG``), size, components."""

    kind: str
    rows: int
    cols: int
    components: int


def declared_size(data: bytes, kind: str) -> DeclaredSize | None:
    """The size the ``kind`` (``jpeg2000`` or ``jpeg``) codestream at the start of ``data`` declares."""
    if kind == "jpeg2000":
        return jpeg2000_size(data)
    if kind == "jpeg":
        return jpeg_size(data)
    raise ValueError(f"unknown codestream kind {kind!r}")


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contents of the ``jp2c`` box of a JP2 file (None when the data ends first)."""
    offset = 0
    while offset + 8 <= len(data):
        length, box = struct.unpack_from(">I4s", data, offset)
        header = 8
        if length == 1:
            if offset + 16 > len(data):
                return None
            length, header = struct.unpack_from(">Q", data, offset + 8)[0], 16
        if box == b"jp2c":
            return data[offset + header :]
        if length == 0:
            raise CodestreamError("JP2 file without a codestream (jp2c) box")
        if length < header:
            raise CodestreamError(f"JP2 box {box!r} with invalid length {length}")
        offset += length
    return None


def jpeg2000_size(data: bytes) -> DeclaredSize | None:
    """Size from the SIZ segment, which must follow SOC directly (ISO/IEC 15444-1 A.5.1)."""
    if data.startswith(JP2_SIGNATURE):
        inner = _jp2_codestream(data)
        return None if inner is None else jpeg2000_size(inner)
    if len(data) < 4:
        return None
    if data[:2] != J2K_SOC or data[2:4] != J2K_SIZ:
        raise CodestreamError("not a JPEG 2000 codestream (no SOC marker followed by SIZ)")
    if len(data) < 4 + 38:
        return None
    (length, _capabilities, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, components) = (
        struct.unpack_from(">HHIIIIIIIIH", data, 4)
    )
    if not 1 <= components <= 16384 or length != 38 + 3 * components:
        raise CodestreamError(f"JPEG 2000 SIZ segment: length {length} does not fit {components} components")
    if xosiz >= xsiz or yosiz >= ysiz:
        raise CodestreamError(f"JPEG 2000 SIZ segment: image offset {xosiz},{yosiz} not inside {xsiz}x{ysiz}")
    if not xtsiz or not ytsiz or xtosiz > xosiz or ytosiz > yosiz:
        raise CodestreamError("JPEG 2000 SIZ segment: invalid tile grid")
    return DeclaredSize("JPEG 2000", rows=ysiz - yosiz, cols=xsiz - xosiz, components=components)


def jpeg_size(data: bytes) -> DeclaredSize | None:
    """Size from the first frame header (SOFn) of a JPEG or JPEG-LS stream."""
    if len(data) < 2:
        return None
    if data[:2] != JPEG_SOI:
        raise CodestreamError("not a JPEG codestream (no SOI marker)")
    offset = 2
    while True:
        while offset < len(data) and data[offset] != 0xFF:
            offset += 1  # stray bytes between segments: decoders skip them too
        while offset < len(data) and data[offset] == 0xFF:
            offset += 1  # fill bytes
        if offset >= len(data):
            return None
        marker = data[offset]
        offset += 1
        if marker in STANDALONE_MARKERS:
            continue
        if marker in (SOS, EOI, 0xD8):
            raise CodestreamError(f"JPEG codestream: marker FF{marker:02X} before any frame header (SOF)")
        if offset + 2 > len(data):
            return None
        length = struct.unpack_from(">H", data, offset)[0]
        if length < 2:
            raise CodestreamError(f"JPEG codestream: segment FF{marker:02X} with invalid length {length}")
        if marker in SOF_MARKERS:
            if offset + 8 > len(data):
                return None
            _length, _precision, rows, cols, components = struct.unpack_from(">HBHHB", data, offset)
            kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
            return DeclaredSize(kind, rows=rows, cols=cols, components=components)
        offset += length
