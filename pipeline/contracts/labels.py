"""The label vocabulary shared by every site, and a site's ``labels.csv``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from pipeline.contracts.files import restore_cell

CLASS_NAMES: tuple[str, ...] = ("normal", "bacterial", "viral")
NORMAL_INDEX = 0
LABEL_COLUMNS = ("file", "label")
EXPECTED = "expected a UTF-8 CSV with columns file,label[,patient_id]"


class LabelsError(ValueError):
    """``labels.csv`` cannot be used; ``str(error)`` is one line naming the file and the line."""


def label_index(name: str) -> int:
    """Map a label name (case-insensitive) to its class index; raise a clear error otherwise."""
    key = name.strip().lower()
    if key not in CLASS_NAMES:
        raise ValueError(f"unknown label {name!r}: expected one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(key)


def _text(path: Path) -> str:
    """The file decoded as UTF-8 (a byte order mark is dropped)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise LabelsError(
            f"{path} line {line}: byte 0x{data[error.start]:02x} is not UTF-8; save the file as UTF-8 CSV"
        ) from None


def read_labels(labels_csv: Path) -> pd.DataFrame:
    """The labels table (``file``, ``label``, optional ``patient_id``), one row per file, indexed by file.

    Every cell is text. File names are stripped and use ``/``; blank lines are skipped; a
    spreadsheet-neutralised cell (``'=x``, see ``pipeline.contracts.files``) is read back as written.
    Raises LabelsError for text that is not UTF-8, an empty file, a header without
    ``file`` / ``label``, a row with another number of fields than the header, an empty
    file name or a file listed twice; the message names the file and the line, but no
    source file name (it may reach logs that leave the site).
    """
    if not labels_csv.is_file():
        raise FileNotFoundError(f"labels file {labels_csv} not found: expected columns file,label")
    reader = csv.reader(io.StringIO(_text(labels_csv), newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    line_of: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                missing = [c for c in LABEL_COLUMNS if c not in header]
                if missing:
                    raise LabelsError(
                        f"{labels_csv} line {line}: header lacks column(s) {', '.join(missing)}; {EXPECTED}"
                    )
                if len(set(header)) < len(header):
                    raise LabelsError(f"{labels_csv} line {line}: a column name appears twice in the header")
                continue
            if len(row) != len(header):
                raise LabelsError(
                    f"{labels_csv} line {line}: {len(row)} fields, the header has {len(header)}"
                )
            cells = [str(restore_cell(cell)) for cell in row]
            name = cells[header.index("file")].strip().replace("\\", "/")
            if not name:
                raise LabelsError(f"{labels_csv} line {line}: empty file name")
            if name in line_of:
                raise LabelsError(
                    f"{labels_csv} line {line}: the file of line {line_of[name]} is listed again; "
                    "keep one row each"
                )
            line_of[name] = line
            cells[header.index("file")] = name
            rows.append(cells)
    except csv.Error as error:
        raise LabelsError(f"{labels_csv} line {reader.line_num}: {error}") from None
    if header is None:
        raise LabelsError(f"{labels_csv} line 1: the file is empty; {EXPECTED}")
    return pd.DataFrame(rows, columns=header, dtype=str).set_index("file")
