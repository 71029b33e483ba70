"""The per-site training cache: what preprocessing writes and training reads.

Layout of a cache folder (it holds no identifying data)::

    manifest.csv          one row per accepted image
    arrays/<image_key>.npy  float32 array (H, W) with values in [0, 1]

``manifest.csv`` columns: ``image_key`` (pseudonymous image id), ``patient_key``
(keyed hash of the patient id with the site's secret), ``label`` (class index, see
``pipeline.contracts.labels``), ``split`` (train / val / test), ``preprocessing_version``,
plus descriptive columns: technical (``pixel_spacing_mm``, ``bits_stored``, ...) and the coarse
subgroup categories :data:`SUBGROUP_COLUMNS` (view, sex, age band, equipment maker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MANIFEST_NAME = "manifest.csv"
ARRAYS_DIR = "arrays"
REQUIRED_COLUMNS = ("image_key", "patient_key", "label", "split", "preprocessing_version")
SPLITS = ("train", "val", "test")
# Coarse, non-identifying categories for subgroup analysis (pipeline.ingestion.header).
SUBGROUP_COLUMNS = ("view", "sex", "age_band", "manufacturer")


@dataclass(frozen=True)
class SplitArrays:
    """Images (N, 1, H, W) float32, labels (N,) int64 and patient keys of one split."""

    images: np.ndarray
    labels: np.ndarray
    patient_keys: list[str]


class SiteCache:
    """One site's preprocessed cache folder: where its files are (preprocessing writes them there)
    and reading them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def arrays_dir(self) -> Path:
        """The folder of the image arrays, one ``<image_key>.npy`` each."""
        return self.root / ARRAYS_DIR

    def array_path(self, image_key: str) -> Path:
        return self.arrays_dir / f"{image_key}.npy"

    def array_files(self) -> list[Path]:
        """Every image array file in the cache, listed or not in the manifest."""
        return sorted(self.arrays_dir.glob("*.npy"))

    def manifest(self) -> pd.DataFrame:
        """Load the manifest, checking that it exists and has the required columns."""
        if not self.manifest_path.is_file():
            raise FileNotFoundError(
                f"no cache manifest at {self.manifest_path}: run the site preprocessing first"
            )
        frame = pd.read_csv(self.manifest_path, dtype={"image_key": str, "patient_key": str})
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{self.manifest_path} lacks columns {missing}")
        return frame

    def load_split(self, split: str) -> SplitArrays:
        """Load every image of one split into memory."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
        rows = self.manifest()
        rows = rows[rows["split"] == split]
        if rows.empty:
            size = (0, 1, 0, 0)
            return SplitArrays(np.zeros(size, np.float32), np.zeros(0, np.int64), [])
        images = np.stack([np.load(self.array_path(k)) for k in rows["image_key"]])
        return SplitArrays(
            images=images[:, None].astype(np.float32, copy=False),
            labels=rows["label"].to_numpy(np.int64),
            patient_keys=rows["patient_key"].tolist(),
        )


def load_splits(roots: Sequence[str | Path], split: str) -> SplitArrays:
    """Concatenate one split across several site caches (used for centralised baselines)."""
    parts = [SiteCache(r).load_split(split) for r in roots]
    parts = [p for p in parts if len(p.labels)]
    if not parts:
        raise ValueError(f"no {split} images in caches {[str(r) for r in roots]}")
    return SplitArrays(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        patient_keys=[k for p in parts for k in p.patient_keys],
    )
