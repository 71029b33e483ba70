"""The label vocabulary shared by every site."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("normal", "bacterial", "viral")
NORMAL_INDEX = 0


def label_index(name: str) -> int:
    """Map a label name (case-insensitive) to its class index; raise a clear error otherwise."""
    key = name.strip().lower()
    if key not in CLASS_NAMES:
        raise ValueError(f"unknown label {name!r}: expected one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(key)
