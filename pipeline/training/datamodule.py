"""Training data from preprocessed site caches, held in memory.

One cache folder trains a site alone (local or federated); all sites' folders together
give the centralised baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.data.utils import set_rnd, worker_init_fn
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from pipeline.contracts.cache import SiteCache, SplitArrays, load_splits
from transforms.image import train_augmentation

Transform = Callable[[torch.Tensor], torch.Tensor]


class ImageDataset(Dataset):
    """(image (1, H, W), label) pairs of one split, optionally augmented."""

    def __init__(self, split: SplitArrays, transform: Transform | None = None) -> None:
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class CacheDataModule(pl.LightningDataModule):
    """Train / val / test splits of one or more site caches.

    ``augment`` is a ``data.augment`` mapping for :func:`transforms.image.train_augmentation`
    (``None`` or ``prob: 0`` disables it). ``seed`` fixes the train shuffle and the
    augmentation draws. ``image_size``, when given, is checked against the cached arrays.
    """

    def __init__(
        self,
        cache_dirs: Sequence[str | Path],
        batch_size: int = 32,
        num_workers: int = 0,
        augment: Mapping | None = None,
        seed: int = 0,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if not cache_dirs:
            raise ValueError("CacheDataModule needs at least one cache folder")
        self.cache_dirs = [Path(d) for d in cache_dirs]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = dict(augment) if augment else None
        self.seed = seed
        self.image_size = image_size
        self.splits: dict[str, ImageDataset] = {}

    @classmethod
    def from_config(cls, data: DictConfig, cache_dirs: Sequence[str | Path], seed: int) -> "CacheDataModule":
        """Build from the ``data`` config group (batch_size, num_workers, augment, image_size)."""
        return cls(
            cache_dirs,
            batch_size=int(data.batch_size),
            num_workers=int(data.num_workers),
            augment=data.get("augment"),
            seed=seed,
            image_size=data.get("image_size"),
        )

    @property
    def num_train_examples(self) -> int:
        """Number of training images (the site's weight in federated averaging)."""
        return len(self.dataset("train"))

    def dataset(self, split: str) -> ImageDataset:
        """The split's dataset, loaded into memory on first use."""
        if split not in self.splits:
            self.splits[split] = ImageDataset(self._load(split), self._transform(split))
        return self.splits[split]

    def _load(self, split: str) -> SplitArrays:
        arrays = load_splits(self.cache_dirs, split)
        size = self.image_size
        if size is not None and arrays.images.shape[-2:] != (size, size):
            raise ValueError(
                f"caches {[str(d) for d in self.cache_dirs]} hold images of "
                f"{arrays.images.shape[-2:]} pixels but data.image_size={size}: "
                "preprocess the sites again at this size or set data.image_size to match"
            )
        return arrays

    def _transform(self, split: str) -> Transform | None:
        if split != "train" or not self.augment or not float(self.augment.get("prob", 0)):
            return None
        transform = train_augmentation(self.augment)
        set_rnd(transform, self.seed)
        return transform

    def has_split(self, split: str) -> bool:
        """Whether any of the caches holds images of ``split``."""
        return any((SiteCache(d).manifest()["split"] == split).any() for d in self.cache_dirs)

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            if split == "train" or self.has_split(split):
                self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=workers,
            worker_init_fn=worker_init_fn if workers else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # No validation split at this site: Lightning skips validation.
        return self._loader("val", shuffle=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
