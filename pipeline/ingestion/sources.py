"""The entries of a site's input folder, and what is refused before any file is opened.

Symbolic links (files or folders) that resolve outside the input folder are refused unless
``follow_external_links``; a link to a folder inside it is skipped (its files are listed under
their own path), and a link to a folder already listed (a loop) is refused. Broken links, FIFOs
and other special entries are listed too, so that the report accounts for every entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EXTERNAL_LINK = (
    "symbolic link to a {kind} outside the input folder: not followed "
    "(preprocess.follow_external_links is false)"
)
INTERNAL_FOLDER_LINK = (
    "symbolic link to a folder inside the input folder: its files are listed under their own path"
)
LINK_LOOP = "symbolic link to a folder already listed (a loop or a second path to it): not followed"
UNDER_REFUSED_LINK = "inside a linked folder that is not followed (see the folder's own row)"


@dataclass
class SourceListing:
    """The entries of an input folder: ``files`` (posix paths relative to it, sorted), and
    ``refused``: the links that are not followed, each with its (status, reason)."""

    files: list[str]
    refused: dict[str, tuple[str, str]]


def source_files(input_dir: Path, follow_external_links: bool = False) -> SourceListing:
    """Every non-hidden entry under ``input_dir`` that is not a folder, and every link not followed.

    Broken links, FIFOs and other special entries are listed too, so that the report
    accounts for them instead of silently dropping them. A symbolic link (to a file or a
    folder) whose target lies outside ``input_dir`` is refused unless
    ``follow_external_links``; a link to a folder inside it is not followed (its files are
    listed under their real path), nor is a link to a folder already listed (loops).
    """
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found: check the site's input_dir")
    root = os.path.realpath(input_dir)
    files: list[str] = []
    refused: dict[str, tuple[str, str]] = {}
    followed = {root}

    def inside(target: str) -> bool:
        return target == root or target.startswith(root.rstrip(os.sep) + os.sep)

    def walk(folder: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            if not prefix:
                raise
            refused[prefix.rstrip("/")] = (
                "rejected",
                f"unreadable folder: {type(error).__name__} ({error.strerror})",
            )
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                is_folder = os.path.isdir(target)
                if not inside(target) and not follow_external_links:
                    refused[rel] = ("rejected", EXTERNAL_LINK.format(kind="folder" if is_folder else "file"))
                elif not is_folder:
                    files.append(rel)
                elif inside(target):
                    refused[rel] = ("skipped", INTERNAL_FOLDER_LINK)
                elif target in followed:
                    refused[rel] = ("rejected", LINK_LOOP)
                else:
                    followed.add(target)
                    walk(entry.path, rel + "/")
            elif entry.is_dir(follow_symlinks=False):
                walk(entry.path, rel + "/")
            else:
                files.append(rel)

    walk(root, "")
    return SourceListing(files=sorted([*files, *refused]), refused=refused)


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes (0 when it cannot be read: the worker reports why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
