"""Decide whether a read image is a usable chest radiograph: a reason string, or None.

Rules come from ``cfg.preprocess.acceptance``. DICOM-tag rules (modality, body part, view,
frames) only apply to DICOM files; size rules apply to every format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AcceptanceRules:
    """Allowed values (upper case) and minimum size of an acceptable image.

    ``allow_missing_body_part`` / ``allow_missing_view``: accept DICOM files that lack
    BodyPartExamined / ViewPosition (default: reject them, the reason names the tag).
    """

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)
    views: tuple[str, ...] = ("PA", "AP")
    min_rows: int = 64
    min_cols: int = 64
    allow_missing_body_part: bool = False
    allow_missing_view: bool = False

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> "AcceptanceRules":
        """Build from a config node; list values are upper-cased."""
        upper = lambda values: tuple(str(v).upper() for v in values)  # noqa: E731
        return cls(
            modalities=upper(node["modalities"]),
            body_parts=upper(node["body_parts"]),
            views=upper(node["views"]),
            min_rows=int(node["min_rows"]),
            min_cols=int(node["min_cols"]),
            allow_missing_body_part=bool(node.get("allow_missing_body_part", False)),
            allow_missing_view=bool(node.get("allow_missing_view", False)),
        )


def _tag_reason(keyword: str, value: str | None, allowed: tuple[str, ...], allow_missing: bool) -> str | None:
    if value is None:
        return None if allow_missing else f"{keyword} missing"
    if value not in allowed:
        return f"{keyword} {value!r} not in {list(allowed)}"
    return None


def rejection_reason(meta: Mapping[str, Any], rules: AcceptanceRules) -> str | None:
    """Why the image described by ``meta`` (see ``pipeline.readers``) is rejected, or None."""
    if meta["format"] == "dicom":
        checks = (
            _tag_reason("Modality", meta["modality"], rules.modalities, False),
            _tag_reason("BodyPartExamined", meta["body_part"], rules.body_parts,
                        rules.allow_missing_body_part),
            _tag_reason("ViewPosition", meta["view"], rules.views, rules.allow_missing_view),
            f"multi-frame image ({meta['number_of_frames']} frames)"
            if meta["number_of_frames"] > 1 else None,
        )
        for reason in checks:
            if reason:
                return reason
    if meta["rows"] < rules.min_rows or meta["cols"] < rules.min_cols:
        return (f"image {meta['rows']}x{meta['cols']} smaller than "
                f"{rules.min_rows}x{rules.min_cols}")
    return None
