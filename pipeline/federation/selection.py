"""Which round's global model a federation releases: the best on the sites' validation data.

Each round the sites score the new global model on their validation splits. Their metrics are
pooled (:func:`pooled_metrics`): per-class sensitivities weighted by each site's images of that
class (so the pooled value is the federation's true sensitivity), everything else weighted by
validation images; ``val_min_sensitivity`` is the lowest per-class sensitivity.
:class:`RoundSelector` keeps the best round by ``federation.selection.metric`` (its checkpoint
becomes ``model.pt``) and, with ``federation.selection.patience``, stops the run after that many
rounds without improvement.

Each round's operating threshold (:func:`pooled_threshold`) is chosen on the sites' pooled
validation counts (:mod:`pipeline.evaluation.threshold`) and written into ``model.pt`` with the
round it belongs to (:data:`pipeline.training.checkpoints.OPERATING_THRESHOLD`).

What the selection releases: nothing beyond the pooled validation metrics the sites already
send every round (scalar accuracy, AUCs, loss, per-class sensitivity and class counts of their
validation split, and the threshold counts: docs/privacy.md says what these release). Those
metrics are computed without DP noise, so under DP-SGD the validation split is protected by
nothing but aggregation: a selected round carries that much information about the validation
images, no more, and the training images' guarantee (each site's epsilon) is unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from flwr.app import MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues

from pipeline.contracts.files import atomic_write
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.contracts.layout import RunLayout
from pipeline.contracts.messages import THRESHOLD_COUNTS
from pipeline.evaluation.threshold import operating_threshold, pool_counts
from pipeline.training.checkpoints import OPERATING_THRESHOLD, copy_checkpoint

log = logging.getLogger("fedrad.federation")

MIN_SENSITIVITY = "val_min_sensitivity"


class EarlyStop(RuntimeError):
    """No round improved the selection metric for ``federation.selection.patience`` rounds."""


def pooled_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Pool the sites' evaluation metrics (see the module docstring)."""
    # The sites' evaluation metrics are scalars (pipeline.training.loop.evaluate).
    records = [cast(dict[str, float], dict(next(iter(c.metric_records.values())))) for c in contents]
    pooled: dict[str, float] = {}
    keys = sorted(set().union(*records))
    for key in keys:
        if "_support_" in key or key == weight_key:
            pooled[key] = float(sum(r.get(key, 0.0) for r in records))
            continue
        by = key.replace("_sensitivity_", "_support_") if "_sensitivity_" in key else weight_key
        weights = [r.get(by, 0.0) for r in records if key in r]
        values = [r[key] for r in records if key in r]
        total = sum(weights)
        if total > 0:
            pooled[key] = float(sum(w * v for w, v in zip(weights, values)) / total)
    present = [
        pooled[f"val_sensitivity_{c}"]
        for c in CLASS_NAMES
        if pooled.get(f"val_support_{c}", 0) > 0 and f"val_sensitivity_{c}" in pooled
    ]
    if present:
        pooled[MIN_SENSITIVITY] = min(present)
    return MetricRecord(cast(dict[str, MetricRecordValues], pooled))


def warn_collapsed_classes(server_round: int, metrics: dict[str, float]) -> list[str]:
    """Log one warning naming every class the global model never predicts correctly; return them."""
    collapsed = [
        c
        for c in CLASS_NAMES
        if metrics.get(f"val_support_{c}", 0) > 0 and metrics.get(f"val_sensitivity_{c}") == 0
    ]
    if collapsed:
        log.warning(
            "round %d  the global model's sensitivity for %s is 0 on the sites' validation images: "
            "it never predicts %s (see docs/ml-engineers.md on class balance)",
            server_round,
            " and ".join(collapsed),
            "that class" if len(collapsed) == 1 else "these classes",
        )
    return collapsed


def pooled_threshold(contents: list[RecordDict]) -> dict[str, Any] | None:
    """The operating threshold chosen on the threshold counts of the sites' evaluation replies
    (None when no reply holds them or their validation images hold a single class)."""
    records = [c.config_records[THRESHOLD_COUNTS] for c in contents if THRESHOLD_COUNTS in c.config_records]
    counts = pool_counts(records)
    if counts is None:
        return None
    return operating_threshold(counts, f"the pooled validation images of {len(records)} site(s)")


class RoundSelector:
    """The best round so far by ``metric`` (higher is better), and the early-stopping rule;
    without a ``metric``, the latest round is released. ``model.pt`` carries its round's
    operating threshold once that round's evaluation chose one."""

    def __init__(
        self, output_dir: Path, metric: str | None, patience: int | None, history: Iterable[dict] = ()
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.patience = patience
        self.best: tuple[int, float] | None = None
        self.last_round = 0
        self.thresholds: dict[int, dict[str, Any]] = {}
        for record in history:  # a resumed run continues from the rounds already recorded
            threshold = record.get("operating_threshold")
            self.consider(int(record["round"]), record.get("val") or {}, threshold, copy=False)

    def consider(
        self,
        server_round: int,
        metrics: dict[str, float],
        threshold: dict[str, Any] | None = None,
        copy: bool = True,
    ) -> bool:
        """Whether round ``server_round`` is the best so far; if so (and ``copy``), its checkpoint
        becomes ``model.pt`` (with ``threshold``) and ``selection.json`` names it, now or once it
        is written (:meth:`release_if_best`)."""
        self.last_round = max(self.last_round, server_round)
        if threshold is not None:
            self.thresholds[server_round] = threshold
        if self.metric is None:
            if copy:  # the latest round is the model: (re)write it now that its threshold is known
                self.release(server_round)
            return False
        if self.metric not in metrics:
            return False
        value = float(metrics[self.metric])
        if self.best is not None and value <= self.best[1]:
            return False
        self.best = (server_round, value)
        if copy:
            self.release_if_best(server_round)
        return True

    def release_if_best(self, server_round: int) -> None:
        """If ``server_round`` is the best round and its checkpoint is written, copy it to
        ``model.pt`` and record the choice in ``selection.json``."""
        if self.best is None or self.best[0] != server_round:
            return
        value = self.best[1]
        if not self.release(server_round):
            return
        threshold = self.thresholds.get(server_round)
        choice = {"round": server_round, "metric": self.metric, "value": value}
        if threshold is not None:
            choice["operating_threshold"] = threshold["value"]
        atomic_write(RunLayout(self.output_dir).selection, json.dumps(choice, indent=1).encode())
        log.info("round %d  selected as the released model (%s=%.4f)", server_round, self.metric, value)

    def release(self, server_round: int) -> bool:
        """Write round ``server_round``'s checkpoint to ``model.pt`` with its operating threshold
        (when chosen); False while the checkpoint is not written yet."""
        source = RunLayout(self.output_dir).checkpoint(server_round)
        if not source.is_file():
            return False
        threshold = self.thresholds.get(server_round)
        extra = {OPERATING_THRESHOLD: threshold} if threshold is not None else {}
        copy_checkpoint(source, RunLayout(self.output_dir).model, extra)
        return True

    def should_stop(self) -> bool:
        """True once ``patience`` rounds have passed without improvement."""
        if self.patience is None or self.best is None:
            return False
        return self.last_round - self.best[0] >= int(self.patience)
