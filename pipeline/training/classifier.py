"""The LightningModule that trains and scores any classification network."""

from __future__ import annotations

from functools import partial
from typing import cast

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
    MulticlassRecall,
)

from pipeline.contracts.labels import CLASS_NAMES, NORMAL_INDEX
from pipeline.privacy.dp import PrivateTraining

Batch = tuple[torch.Tensor, torch.Tensor]


def balanced_class_weights(
    labels: torch.Tensor | list[int], num_classes: int = len(CLASS_NAMES)
) -> torch.Tensor:
    """Per-class loss weights ``N / (K * n_c)`` from one site's training labels (a class the
    site lacks gets weight 0: nothing of it is trained on), normalised to mean 1 over the
    site's images, so the loss keeps its scale."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def pneumonia_probability(probabilities: torch.Tensor) -> torch.Tensor:
    """Probability of pneumonia (any kind) vs normal: ``1 - p(normal)``."""
    return 1.0 - probabilities[:, NORMAL_INDEX]


class XrayClassifier(pl.LightningModule):
    """Cross-entropy training of ``net``; logs ``train/loss`` and, for ``val/`` and ``test/``,
    ``loss``, ``acc``, ``auroc`` (macro one-vs-rest), ``mcc``, ``pneumonia_auroc``, and per
    class ``sensitivity_<class>`` (recall) with ``support_<class>`` (images of that class).

    ``optimizer`` is a partial optimizer constructor (Hydra ``_partial_: true``) that
    receives the network's trainable parameters. Setting ``private`` (a
    :class:`pipeline.privacy.dp.PrivateTraining`) before fitting trains with DP-SGD:
    per-sample clipping in :meth:`backward`, noise and accounting in the optimizer.

    ``class_weights`` (one per class) weight each image's loss, e.g. inversely to its class's
    frequency at the site (:func:`balanced_class_weights`), so that a site heavy in one class
    does not teach the model to ignore the others; the loss stays a plain batch mean, as
    per-sample clipping expects. ``proximal`` (FedProx): after every optimiser step the
    trainable weights move towards the received global ones, ``w -= lr * mu * (w - w_global)``,
    a step that does not depend on the data (so it adds nothing to DP-SGD's privacy cost).
    """

    class_weights: torch.Tensor | None  # a buffer (registered in __init__)

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        num_classes: int = len(CLASS_NAMES),
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.num_classes = num_classes
        self.val_metrics = self._metrics(num_classes, "val/")
        self.test_metrics = self._metrics(num_classes, "test/")
        self.val_pneumonia_auroc = BinaryAUROC()
        self.test_pneumonia_auroc = BinaryAUROC()
        self.val_recall = MulticlassRecall(num_classes, average=None)
        self.test_recall = MulticlassRecall(num_classes, average=None)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.private: PrivateTraining | None = None
        self.proximal: tuple[float, dict[str, torch.Tensor]] | None = None

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
        losses = F.cross_entropy(self.net(images), labels, reduction="none")
        if self.class_weights is not None:
            losses = losses * self.class_weights[labels]
        loss = losses.mean() if len(labels) else losses.sum()
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._score(batch, "val/", self.val_metrics, self.val_pneumonia_auroc, self.val_recall)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._score(batch, "test/", self.test_metrics, self.test_pneumonia_auroc, self.test_recall)

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val/", self.val_recall)

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test/", self.test_recall)

    def _score(
        self,
        batch: Batch,
        prefix: str,
        metrics: MetricCollection,
        pneumonia_auroc: BinaryAUROC,
        recall: MulticlassRecall,
    ) -> None:
        images, labels = batch
        logits = self.net(images)
        probabilities = logits.softmax(dim=1)
        metrics.update(probabilities, labels)
        recall.update(probabilities, labels)
        pneumonia_auroc.update(pneumonia_probability(probabilities), labels != NORMAL_INDEX)
        size = labels.shape[0]
        self.log(f"{prefix}loss", F.cross_entropy(logits, labels), batch_size=size)
        self.log_dict(metrics, batch_size=size)
        self.log(f"{prefix}pneumonia_auroc", pneumonia_auroc, batch_size=size)

    def _log_per_class(self, prefix: str, recall: MulticlassRecall) -> None:
        """``sensitivity_<class>`` (recall of the most probable class) and ``support_<class>``."""
        sensitivity = recall.compute()
        # Tensors: the states are lists only for samplewise statistics.
        support = cast(torch.Tensor, recall.tp) + cast(torch.Tensor, recall.fn)
        for index, name in enumerate(CLASS_NAMES[: self.num_classes]):
            self.log(f"{prefix}sensitivity_{name}", sensitivity[index].float())
            self.log(f"{prefix}support_{name}", support[index].float())
        recall.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable)
        return optimizer if self.private is None else self.private.optimizer(self.net, optimizer)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.proximal is not None:
            mu, global_state = self.proximal
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            with torch.no_grad():
                for name, param in self.net.named_parameters():
                    if param.requires_grad:
                        param.sub_(lr * mu * (param - global_state[name].to(param.device)))

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.private is None:
            super().backward(loss, *args, **kwargs)
        else:
            self.private.backward(loss)
