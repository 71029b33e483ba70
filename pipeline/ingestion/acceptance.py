"""Decide whether an image is a usable chest radiograph: a reason string, or None.

Rules come from ``cfg.preprocess.acceptance`` and only need the header
(:class:`pipeline.ingestion.header.HeaderFacts`, read by ``pipeline.ingestion.readers``), so a
rejected file is never decoded. DICOM-tag rules (modality, body part, view, photometric
interpretation, frames) only apply to DICOM files; the size rules apply to every format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pipeline.ingestion.header import HeaderFacts

MULTIFRAME_POLICIES = ("reject", "first_frame")


@dataclass(frozen=True)
class AcceptanceRules:
    """Allowed values (upper case), size limits and the multi-frame policy.

    Their values (and what each means) are in ``conf/preprocess/chest_xray.yaml``
    (``preprocess.acceptance``): :meth:`from_config` builds the rules from there.
    ``allow_missing_body_part`` / ``allow_missing_view``: accept DICOM files that lack
    BodyPartExamined / ViewPosition (else the reason names the tag).
    ``max_pixels``: Rows x Columns above this is rejected from the header, before decoding.
    ``multiframe``: ``reject`` or ``first_frame`` (take frame 1 of the object).
    ``max_decode_mb``: the memory cap of reading and decoding one file (file size, inflated
    size, estimated decode memory; see ``pipeline.ingestion.readers``), checked before each step.
    """

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    views: tuple[str, ...]
    photometrics: tuple[str, ...]
    min_rows: int
    min_cols: int
    max_pixels: int
    multiframe: str
    allow_missing_body_part: bool
    allow_missing_view: bool
    max_decode_mb: int

    def __post_init__(self) -> None:
        if self.multiframe not in MULTIFRAME_POLICIES:
            raise ValueError(
                f"preprocess.acceptance.multiframe={self.multiframe!r}: expected one of {MULTIFRAME_POLICIES}"
            )

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> "AcceptanceRules":
        """Build from ``preprocess.acceptance``, the one place the rules' values are defined:
        every key is required (and no other), list values are upper-cased."""
        expected = {f.name: f.type for f in fields(cls)}
        missing, unknown = sorted(set(expected) - set(node)), sorted(set(node) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"preprocess.acceptance: missing keys {missing}, unknown keys {unknown} "
                "(see conf/preprocess/chest_xray.yaml)"
            )
        values: dict[str, Any] = {}
        for name, kind in expected.items():
            value = node[name]
            if "tuple" in str(kind):
                values[name] = tuple(str(v).upper() for v in value)
            else:
                values[name] = {"int": int, "bool": bool, "str": str}[str(kind)](value)
        return cls(**values)


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
