"""One source file's outcome (:class:`FileRecord`) and the site's memory of earlier runs: the
source index (``private/source_index.csv``, written at the end of a run) and the journal of an
interrupted run (``private/progress.jsonl``, one line per finished file)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.contracts.cache import SUBGROUP_COLUMNS
from pipeline.contracts.files import read_csv
from pipeline.ingestion.header import UNKNOWN


@dataclass
class FileRecord:
    """One source file's outcome; the rows of ``private/source_index.csv``.

    ``sop_key`` is a keyed hash of the SOPInstanceUID (the UID itself is never stored).
    ``duplicate_of`` names the file this one duplicates (then it is rejected although it
    was processed; the decision is made again on every run).
    """

    file: str
    status: str
    reason: str = ""
    sha256: str = ""
    image_key: str = ""
    patient_key: str = ""
    sop_key: str = ""
    format: str = ""
    version: str = ""
    rules: str = ""
    rows: int = 0
    cols: int = 0
    frames: int = 0
    bits_stored: int = 0
    pixel_spacing_mm: float = float("nan")
    view: str = UNKNOWN
    sex: str = UNKNOWN
    age_band: str = UNKNOWN
    manufacturer: str = UNKNOWN
    duplicate_of: str = ""
    reused: bool = False


def read_index(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    text_columns = (
        "file",
        "status",
        "sha256",
        "image_key",
        "patient_key",
        "sop_key",
        "reason",
        "format",
        "version",
        "rules",
        "duplicate_of",
        *SUBGROUP_COLUMNS,
    )
    table = read_csv(
        path,
        dtype=dict.fromkeys(text_columns, str),
        keep_default_na=False,
        na_values={"pixel_spacing_mm": [""]},
    )
    names = {f.name for f in fields(FileRecord)}
    return {row["file"]: {k: v for k, v in row.items() if k in names} for row in table.to_dict("records")}


def read_progress(path: Path) -> dict[str, dict[str, Any]]:
    """Records an interrupted run finished (a torn last line is ignored)."""
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[row["file"]] = row
    return records


def previous_records(index: Path, journal: Path) -> dict[str, dict[str, Any]]:
    """What earlier runs recorded per file: the index, updated by an interrupted run's journal."""
    return {**read_index(index), **read_progress(journal)}
