"""Where a site's files live: its source images, labels, secret, cache and reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    def under(cls, sites_root: str | Path, name: str) -> "SitePaths":
        """The conventional layout of a site folder, as written by ``scripts/prepare_demo.py``."""
        root = Path(sites_root) / name
        return cls(
            name=name,
            input_dir=root / "dicom",
            labels_csv=root / "labels.csv",
            work_dir=root / "fedrad",
            secret_file=root / "site_secret.key",
        )
