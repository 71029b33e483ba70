"""Scan output files byte by byte for known identifying values (de-identification proof).

Used by the tests with invented identifiers planted in DICOM headers; a site can run the
same scan with values it knows (``find_values(files_under([work_dir]), values)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def files_under(roots: Iterable[Path]) -> list[Path]:
    """Every regular file under ``roots`` (hidden ones included), sorted."""
    return sorted(p for root in roots for p in Path(root).rglob("*") if p.is_file())


def encodings(value: str) -> set[bytes]:
    """The byte forms a value may take in a file: UTF-8 and UTF-16-LE, and for person names
    (``Family^Given``) also with the ``^`` separators written as spaces."""
    forms = {value, value.replace("^", " ")}
    return {form.encode(codec) for form in forms for codec in ("utf-8", "utf-16-le")}


def find_values(files: Iterable[Path], values: Iterable[str]) -> dict[str, list[str]]:
    """``{file: [values found in it]}`` over every byte of every file (empty when clean)."""
    patterns = {value: encodings(value) for value in values if value}
    found: dict[str, list[str]] = {}
    for path in files:
        data = path.read_bytes()
        hits = [value for value, forms in patterns.items() if any(form in data for form in forms)]
        if hits:
            found[str(path)] = hits
    return found
