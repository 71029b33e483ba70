"""The evaluated cases: every image of one split (or of all splits) of one or more site caches,
with the model's probabilities and the coarse subgroup categories the cache keeps, and what each
site knows locally about its own files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.contracts.cache import SPLITS, SUBGROUP_COLUMNS, SiteCache
from pipeline.contracts.files import read_csv
from pipeline.contracts.layout import WorkDir
from pipeline.evaluation.scoring import check_image_size
from pipeline.evaluation.threshold import pneumonia_score
from pipeline.ingestion.header import UNKNOWN
from pipeline.training.loop import predict_probabilities

ALL_SPLITS = "all"


@dataclass(frozen=True)
class SiteIndex:
    """One site's lookup from the ids a clinician may use to the cache's image keys.

    ``files`` maps a source file name to (image_key, status, reason) from the site-only
    ``private/source_index.csv`` (empty when the evaluation runs without it);
    ``image_keys`` holds every image key of the cache, all splits.
    """

    name: str
    files: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    image_keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Cases:
    """The evaluated images, pooled over sites (row order: site after site)."""

    sites: np.ndarray  # site name per image
    image_keys: np.ndarray
    patient_keys: np.ndarray  # "<site>/<patient_key>": patients never merge across sites
    labels: np.ndarray  # class index
    probabilities: np.ndarray  # (N, classes)
    # (N, len(SUBGROUP_COLUMNS)): view, sex, age band, maker per image; None: all unknown
    subgroups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def pneumonia_score(self) -> np.ndarray:
        """The model's probability of pneumonia (bacterial or viral)."""
        return pneumonia_score(self.probabilities)

    def subgroup(self, column: str) -> np.ndarray:
        """Each image's category of ``column`` (one of SUBGROUP_COLUMNS)."""
        if self.subgroups is None:
            return np.full(len(self), UNKNOWN)
        return self.subgroups[:, SUBGROUP_COLUMNS.index(column)]

    def subset(self, mask: np.ndarray) -> "Cases":
        return Cases(
            self.sites[mask],
            self.image_keys[mask],
            self.patient_keys[mask],
            self.labels[mask],
            self.probabilities[mask],
            None if self.subgroups is None else self.subgroups[mask],
        )


def site_name(cache_dir: Path) -> str:
    """The site a cache belongs to (the conventional layout, :mod:`pipeline.contracts.layout`)."""
    return WorkDir.of_cache(cache_dir).site_name


def load_cases(
    checkpoint: Path,
    net: nn.Module,
    info: dict[str, Any],
    cache_dirs: list[Path],
    names: list[str],
    split: str,
) -> Cases:
    """Score ``split`` (or every split: :data:`ALL_SPLITS`) of every cache with ``net`` (loaded
    from ``checkpoint`` with ``info``)."""
    parts = []
    for cache_dir, name in zip(cache_dirs, names, strict=True):
        cache = SiteCache(cache_dir)
        manifest = cache.manifest()
        for column in SUBGROUP_COLUMNS:  # caches written before the subgroup columns existed
            if column not in manifest.columns:
                manifest[column] = UNKNOWN
        for part in SPLITS if split == ALL_SPLITS else (split,):
            data = cache.load_split(part)
            if len(data.labels):
                check_image_size(checkpoint, info, data.images)
            rows = manifest[manifest["split"] == part]
            parts.append(
                Cases(
                    np.full(len(rows), name),
                    rows["image_key"].to_numpy(str),
                    np.array([f"{name}/{p}" for p in data.patient_keys], dtype=str),
                    data.labels,
                    predict_probabilities(net, data.images),
                    rows[list(SUBGROUP_COLUMNS)].fillna(UNKNOWN).to_numpy(str),
                )
            )
    cases = Cases(*(np.concatenate([getattr(p, f) for p in parts]) for f in Cases.__dataclass_fields__))
    if not len(cases):
        raise ValueError(f"no {split} images in caches {[str(c) for c in cache_dirs]}")
    return cases


def load_site_index(cache_dir: Path, name: str) -> SiteIndex:
    """The site's source-file lookup (when its private folder is present) and image keys."""
    keys = frozenset(SiteCache(cache_dir).manifest()["image_key"])
    index_path = WorkDir.of_cache(cache_dir).source_index
    if not index_path.is_file():
        return SiteIndex(name, {}, keys)
    index = read_csv(index_path, dtype=str, keep_default_na=False)
    files = {row.file: (row.image_key, row.status, row.reason) for row in index.itertuples()}
    return SiteIndex(name, files, keys)
