"""Progress inside a long local training: one log line at most every ``every_s`` seconds
(epoch, batch, that batch's loss, elapsed time) and one when such a training ends, instead of a progress
bar that shares a line with the log. A training shorter than ``every_s`` prints nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from pipeline.contracts.console import reach_the_console

log = logging.getLogger("fedrad.training")


def batch_loss(outputs: Any) -> str:
    """The loss of the batch that just ended, as Lightning hands over its training step's output
    (``-`` when the step returned none): the epoch's mean loss is known only at its end."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return f"{float(loss):.4f}" if isinstance(loss, torch.Tensor) and loss.numel() == 1 else "-"


class TrainingProgress(pl.Callback):
    """Log ``label``'s training progress every ``every_s`` seconds and at the end of the fit."""

    def __init__(self, label: str, every_s: float = 30.0) -> None:
        self.label = label
        self.every_s = every_s
        self.started = self.last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.last = time.monotonic()
        reach_the_console(log)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        batches = trainer.num_training_batches
        total = f"/{batches}" if isinstance(batches, int) else ""
        log.info(
            "%s  epoch %d/%d  batch %d%s  loss %s  %.0f s",
            self.label,
            trainer.current_epoch + 1,
            trainer.max_epochs,
            batch_idx + 1,
            total,
            batch_loss(outputs),
            now - self.started,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last == self.started:  # no progress line: a short training needs no end line
            return
        log.info(
            "%s  trained %d epoch(s), %d steps in %.0f s",
            self.label,
            trainer.current_epoch,
            trainer.global_step,
            time.monotonic() - self.started,
        )
