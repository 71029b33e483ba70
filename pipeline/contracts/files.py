"""Crash-safe file writing (a reader sees the old file or the new one, never half of one)
and CSV tables that a spreadsheet opens without running formulas from their cells."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it; True if written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


# Spreadsheet formula injection (OWASP "CSV Injection"): a cell starting with one of these is
# run as a formula by Excel / LibreOffice; a leading single quote makes it text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def neutralise_cell(value: object) -> object:
    """``value`` with a leading ``'`` when it is a string a spreadsheet would run as a formula.

    Strings that are plain numbers (``-1.5``, ``+3``) stay as they are, and so does every
    non-string value. A string that already starts with ``'`` gets one more, so that
    :func:`restore_cell` gives back exactly the original.
    """
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(ESCAPE) or (value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value)):
        return ESCAPE + value
    return value


def restore_cell(value: object) -> object:
    """Undo :func:`neutralise_cell` (a string it did not change is returned unchanged)."""
    if (
        isinstance(value, str)
        and value.startswith(ESCAPE)
        and value[1:].startswith((*FORMULA_STARTS, ESCAPE))
    ):
        return value[1:]
    return value


def csv_bytes(table: pd.DataFrame) -> bytes:
    """``table`` as CSV (no index, ``\\n`` line ends) with every string cell neutralised."""
    safe = table.copy()
    for column in safe.columns:
        if not (pd.api.types.is_numeric_dtype(safe[column]) or pd.api.types.is_bool_dtype(safe[column])):
            safe[column] = safe[column].map(neutralise_cell)
    safe.columns = [neutralise_cell(str(c)) for c in safe.columns]
    return safe.to_csv(index=False, lineterminator="\n").encode()


def write_csv(path: Path, table: pd.DataFrame) -> None:
    """Write ``table`` atomically as a formula-neutralised CSV (see :func:`csv_bytes`)."""
    atomic_write(path, csv_bytes(table))


def read_csv(path: Path, **options: Any) -> pd.DataFrame:
    """``pd.read_csv(path, **options)`` with :func:`neutralise_cell` undone in every text column."""
    table = pd.read_csv(path, **options)
    for column in table.columns:
        if not (pd.api.types.is_numeric_dtype(table[column]) or pd.api.types.is_bool_dtype(table[column])):
            table[column] = table[column].map(restore_cell)
    table.columns = [restore_cell(c) for c in table.columns]
    return table
