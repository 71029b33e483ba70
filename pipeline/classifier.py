"""The LightningModule that trains and scores any classification network."""

from __future__ import annotations

from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassMatthewsCorrCoef,
)

from pipeline.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.privacy.dp import PrivateTraining

Batch = tuple[torch.Tensor, torch.Tensor]


def pneumonia_probability(probabilities: torch.Tensor) -> torch.Tensor:
    """Probability of pneumonia (any kind) vs normal: ``1 - p(normal)``."""
    return 1.0 - probabilities[:, NORMAL_INDEX]


class XrayClassifier(pl.LightningModule):
    """Cross-entropy training of ``net``; logs ``train/loss`` and, for ``val/`` and ``test/``,
    ``loss``, ``acc``, ``auroc`` (macro one-vs-rest), ``mcc`` and ``pneumonia_auroc``.

    ``optimizer`` is a partial optimizer constructor (Hydra ``_partial_: true``) that
    receives the network's parameters. Setting ``private`` (a
    :class:`pipeline.privacy.dp.PrivateTraining`) before fitting trains with DP-SGD:
    per-sample clipping in :meth:`backward`, noise and accounting in the optimizer.
    """

    def __init__(
        self, net: nn.Module, optimizer: partial, num_classes: int = len(CLASS_NAMES)
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.val_metrics = self._metrics(num_classes, "val/")
        self.test_metrics = self._metrics(num_classes, "test/")
        self.val_pneumonia_auroc = BinaryAUROC()
        self.test_pneumonia_auroc = BinaryAUROC()
        self.private: PrivateTraining | None = None

    @staticmethod
    def _metrics(num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "auroc": MulticlassAUROC(num_classes, average="macro"),
                "mcc": MulticlassMatthewsCorrCoef(num_classes),
            },
            prefix=prefix,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._score(batch, "val/", self.val_metrics, self.val_pneumonia_auroc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._score(batch, "test/", self.test_metrics, self.test_pneumonia_auroc)

    def _score(
        self, batch: Batch, prefix: str, metrics: MetricCollection, pneumonia_auroc: BinaryAUROC
    ) -> None:
        images, labels = batch
        logits = self.net(images)
        probabilities = logits.softmax(dim=1)
        metrics.update(probabilities, labels)
        pneumonia_auroc.update(pneumonia_probability(probabilities), labels != NORMAL_INDEX)
        size = labels.shape[0]
        self.log(f"{prefix}loss", F.cross_entropy(logits, labels), batch_size=size)
        self.log_dict(metrics, batch_size=size)
        self.log(f"{prefix}pneumonia_auroc", pneumonia_auroc, batch_size=size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.optimizer_factory(self.net.parameters())
        return optimizer if self.private is None else self.private.optimizer(self.net, optimizer)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.private is None:
            super().backward(loss, *args, **kwargs)
        else:
            self.private.backward(loss)
