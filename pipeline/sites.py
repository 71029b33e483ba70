"""Where a site's files live: its source images, labels, secret, cache and reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SitePaths:
    """The on-premises folders of one site.

    ``input_dir`` and ``labels_csv`` are the hospital's own data (read-only to fedrad);
    ``work_dir`` holds everything fedrad writes: ``cache/`` (identifier-free training
    cache), ``private/`` (site-only bookkeeping such as the source index) and the report.
    """

    name: str
    input_dir: Path
    labels_csv: Path
    work_dir: Path
    secret_file: Path

    @property
    def cache_dir(self) -> Path:
        return self.work_dir / "cache"

    @property
    def private_dir(self) -> Path:
        return self.work_dir / "private"

    @classmethod
    def of_data(cls, data: Mapping[str, Any]) -> list["SitePaths"]:
        """Every site of a ``data`` config node: ``data.sites`` under ``data.sites_root``."""
        subdir = str(data.get("input_subdir") or "dicom")
        return [cls.under(data["sites_root"], name, subdir) for name in data["sites"]]

    @classmethod
    def under(cls, sites_root: str | Path, name: str, input_subdir: str = "dicom") -> "SitePaths":
        """The conventional layout of a site folder, as written by ``scripts/prepare_demo.py``:
        ``<sites_root>/<name>/`` holds ``labels.csv``, the site secret, the ``fedrad`` work dir
        and the source images in the folder ``input_subdir`` (``data.input_subdir``; DICOM, PNG,
        JPEG or NIfTI alike)."""
        root = Path(sites_root) / name
        return cls(
            name=name,
            input_dir=root / input_subdir,
            labels_csv=root / "labels.csv",
            work_dir=root / "fedrad",
            secret_file=root / "site_secret.key",
        )
