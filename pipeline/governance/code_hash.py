"""One fingerprint of the fedrad code a machine runs: what a data owner approves, what a ledger records."""

from __future__ import annotations

import hashlib
import importlib
from functools import cache
from pathlib import Path

CODE_PACKAGES = ("pipeline", "models", "transforms")


def _source_files(package: str) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every source file of an installed package, sorted."""
    root = Path(importlib.import_module(package).__file__).parent
    files = [
        path for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    return sorted((f"{package}/{path.relative_to(root).as_posix()}", path) for path in files)


@cache
def code_hash() -> str:
    """SHA-256 over the names and contents of the installed ``pipeline``, ``models`` and
    ``transforms`` source files: the same code gives the same hash on every machine."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for name, path in _source_files(package):
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
