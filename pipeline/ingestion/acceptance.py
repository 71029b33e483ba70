"""Decide whether an image is a usable chest radiograph: a reason string, or None.

Rules come from ``cfg.preprocess.acceptance`` and only need the header
(:class:`pipeline.ingestion.header.HeaderFacts`, read by ``pipeline.ingestion.readers``), so a
rejected file is never decoded. DICOM-tag rules (modality, body part, view, photometric
interpretation, frames) only apply to DICOM files; the size rules apply to every format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.ingestion.header import HeaderFacts

MULTIFRAME_POLICIES = ("reject", "first_frame")


@dataclass(frozen=True)
class AcceptanceRules:
    """Allowed values (upper case), size limits and the multi-frame policy.

    ``allow_missing_body_part`` / ``allow_missing_view``: accept DICOM files that lack
    BodyPartExamined / ViewPosition (default: reject them, the reason names the tag).
    ``max_pixels``: Rows x Columns above this is rejected from the header, before decoding.
    ``multiframe``: ``reject`` (default) or ``first_frame`` (take frame 1 of the object).
    ``max_decode_mb``: the memory cap of reading and decoding one file (file size, inflated
    size, estimated decode memory; see ``pipeline.ingestion.readers``), checked before each step.
    """

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)
    views: tuple[str, ...] = ("PA", "AP")
    photometrics: tuple[str, ...] = ("MONOCHROME1", "MONOCHROME2")
    min_rows: int = 64
    min_cols: int = 64
    max_pixels: int = 50_000_000
    multiframe: str = "reject"
    allow_missing_body_part: bool = False
    allow_missing_view: bool = False
    max_decode_mb: int = 1024

    def __post_init__(self) -> None:
        if self.multiframe not in MULTIFRAME_POLICIES:
            raise ValueError(
                f"preprocess.acceptance.multiframe={self.multiframe!r}: expected one of {MULTIFRAME_POLICIES}"
            )

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> "AcceptanceRules":
        """Build from a config node; list values are upper-cased, absent keys take defaults."""
        upper = lambda values: tuple(str(v).upper() for v in values)  # noqa: E731
        default = cls()
        return cls(
            modalities=upper(node["modalities"]),
            body_parts=upper(node["body_parts"]),
            views=upper(node["views"]),
            photometrics=upper(node.get("photometrics", default.photometrics)),
            min_rows=int(node["min_rows"]),
            min_cols=int(node["min_cols"]),
            max_pixels=int(node.get("max_pixels", default.max_pixels)),
            multiframe=str(node.get("multiframe", default.multiframe)),
            allow_missing_body_part=bool(node.get("allow_missing_body_part", False)),
            allow_missing_view=bool(node.get("allow_missing_view", False)),
            max_decode_mb=int(node.get("max_decode_mb", default.max_decode_mb)),
        )


def _tag_reason(keyword: str, value: str | None, allowed: tuple[str, ...], allow_missing: bool) -> str | None:
    if value is None:
        return None if allow_missing else f"{keyword} missing"
    if value not in allowed:
        return f"{keyword} {value!r} not in {list(allowed)}"
    return None


def _dicom_reason(header: HeaderFacts, rules: AcceptanceRules) -> str | None:
    frames = header.number_of_frames
    checks = (
        _tag_reason("Modality", header.modality, rules.modalities, False),
        _tag_reason("BodyPartExamined", header.body_part, rules.body_parts, rules.allow_missing_body_part),
        _tag_reason("ViewPosition", header.view, rules.views, rules.allow_missing_view),
        _tag_reason("PhotometricInterpretation", header.photometric, rules.photometrics, False),
        f"multi-frame object ({frames} frames): not a single radiograph "
        "(preprocess.acceptance.multiframe=first_frame takes frame 1)"
        if frames > 1 and rules.multiframe == "reject"
        else None,
    )
    return next((reason for reason in checks if reason), None)


def _size_reason(header: HeaderFacts, rules: AcceptanceRules) -> str | None:
    rows, cols = header.rows, header.cols
    if rows <= 0 or cols <= 0:
        return f"empty image (Rows {rows}, Columns {cols})"
    if rows * cols > rules.max_pixels:
        return (
            f"image {rows}x{cols} = {rows * cols / 1e6:.1f} MP exceeds max_pixels "
            f"{rules.max_pixels / 1e6:.1f} MP (checked before decoding)"
        )
    if rows < rules.min_rows or cols < rules.min_cols:
        return f"image {rows}x{cols} smaller than {rules.min_rows}x{rules.min_cols}"
    return None


def rejection_reason(header: HeaderFacts, rules: AcceptanceRules) -> str | None:
    """Why the image described by ``header`` is rejected, or None."""
    if header.format == "dicom":
        reason = _dicom_reason(header, rules)
        if reason:
            return reason
    return _size_reason(header, rules)
