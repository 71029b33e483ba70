"""FedAvg that reports each site's metrics and records every round to disk."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger("fedrad.federation")


def _site_metrics(replies: list[Message]) -> dict[str, dict[str, float]]:
    """Scalar metrics of each replying site, keyed by its node id."""
    per_site = {}
    for reply in replies:
        if reply.has_error():
            log.warning("site %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        record = next(iter(reply.content.metric_records.values()))
        per_site[str(reply.metadata.src_node_id)] = {k: float(v) for k, v in record.items()}
    return per_site


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k != "num-examples")


class RecordingFedAvg(FedAvg):
    """:class:`flwr.serverapp.strategy.FedAvg` weighted by ``num-examples`` that logs every
    site's metrics and appends one JSON line per round to ``rounds_file``."""

    def __init__(self, rounds_file: Path, **kwargs) -> None:
        super().__init__(weighted_by_key="num-examples", **kwargs)
        self.rounds_file = rounds_file
        self._round: dict = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        per_site = _site_metrics(replies)
        for node, metrics in per_site.items():
            log.info("round %d  site %s  train  %s", server_round, node, _format(metrics))
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._round = {
            "round": server_round,
            "sites_trained": len(per_site),
            "train_per_site": per_site,
            "train": dict(metrics or {}),
        }
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        per_site = _site_metrics(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self._round.update({"val_per_site": per_site, "val": dict(metrics or {})})
        log.info(
            "round %d  global model on sites' validation data  %s",
            server_round, _format(dict(metrics or {})),
        )
        self._write_round()
        return metrics

    def _write_round(self) -> None:
        self.rounds_file.parent.mkdir(parents=True, exist_ok=True)
        with self.rounds_file.open("a") as handle:
            handle.write(json.dumps(self._round) + "\n")
