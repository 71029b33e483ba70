"""The evaluated cases: every image of one split of one or more site caches, with the model's
probabilities, and what each site knows locally about its own files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.files import read_csv
from pipeline.contracts.labels import NORMAL_INDEX
from pipeline.contracts.layout import WorkDir
from pipeline.evaluation.scoring import check_image_size
from pipeline.training.loop import predict_probabilities


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
    """The images of one split, pooled over sites (row order: site after site)."""

    sites: np.ndarray  # site name per image
    image_keys: np.ndarray
    patient_keys: np.ndarray  # "<site>/<patient_key>": patients never merge across sites
    labels: np.ndarray  # class index
    probabilities: np.ndarray  # (N, classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def pneumonia_score(self) -> np.ndarray:
        """The model's probability of pneumonia (bacterial or viral)."""
        return 1.0 - self.probabilities[:, NORMAL_INDEX]

    def subset(self, mask: np.ndarray) -> "Cases":
        return Cases(
            self.sites[mask],
            self.image_keys[mask],
            self.patient_keys[mask],
            self.labels[mask],
            self.probabilities[mask],
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
    """Score ``split`` of every cache with ``net`` (loaded from ``checkpoint`` with ``info``)."""
    parts = []
    for cache_dir, name in zip(cache_dirs, names, strict=True):
        cache = SiteCache(cache_dir)
        manifest = cache.manifest()
        data = cache.load_split(split)
        if len(data.labels):
            check_image_size(checkpoint, info, data.images)
        keys = manifest.loc[manifest["split"] == split, "image_key"].to_numpy(str)
        probabilities = predict_probabilities(net, data.images)
        parts.append(
            Cases(
                np.full(len(keys), name),
                keys,
                np.array([f"{name}/{p}" for p in data.patient_keys], dtype=str),
                data.labels,
                probabilities,
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
