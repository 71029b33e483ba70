"""FedAvg that reports each site's metrics and records every round to disk."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pipeline.contracts.messages import LEDGER_HEAD, METRICS, NUM_EXAMPLES, SITE, SITE_NAME
from pipeline.federation.selection import (
    EarlyStop,
    RoundSelector,
    pooled_metrics,
    pooled_threshold,
    warn_collapsed_classes,
)
from pipeline.federation.server_optimizer import ServerOptimizer
from pipeline.governance.heads import record_heads

log = logging.getLogger("fedrad.federation")

SiteMetrics = dict[str, dict[str, float]]


class TooFewSites(RuntimeError):
    """Fewer than ``federation.min_sites`` sites trained in a round: the federation stops."""


PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a site-reported name the logs may show


class SiteNames:
    """The name of each site, for logs and records: the name the coordinator registered its key
    under (``flwr supernode register --name``); where the SuperLink has none (simulation,
    plain-text test deployments), the name the site gives in its replies (simulated: its
    ``data.sites`` entry); its node id only until either is known."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.registered: set[int] = set()

    def refresh(self, grid: Grid) -> None:
        """Take the registered names of the connected sites from the SuperLink."""
        for node in grid.get_nodes():
            if node.name:
                self.names[int(node.node_id)] = str(node.name)
                self.registered.add(int(node.node_id))

    def reported(self, node_id: int, name: object) -> None:
        """A name a site gave itself; used where no name was registered, if it is a plain name
        (letters, digits, ``._-``, at most 64) that no other site already goes by."""
        if node_id in self.registered or not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
            return
        if name not in (v for k, v in self.names.items() if k != node_id):
            self.names[node_id] = name

    def learn(self, replies: Iterable[Message]) -> None:
        for reply in replies:
            if not reply.has_error() and SITE in reply.content.config_records:
                self.reported(reply.metadata.src_node_id, reply.content.config_records[SITE].get(SITE_NAME))

    def __call__(self, node_id: int) -> str:
        return self.names.get(int(node_id), str(node_id))


def _site_metrics(replies: list[Message], names: SiteNames) -> SiteMetrics:
    """Scalar metrics of each replying site, keyed by its name."""
    names.learn(replies)
    per_site = {}
    for reply in replies:
        if reply.has_error():
            log.warning("site %s failed: %s", names(reply.metadata.src_node_id), reply.error.reason)
            continue
        # The sites' metrics are scalars (pipeline.training.loop.train and evaluate).
        record = cast(Mapping[str, float], next(iter(reply.content.metric_records.values())))
        per_site[names(reply.metadata.src_node_id)] = {k: float(v) for k, v in record.items()}
    return per_site


def _ledger_heads(replies: list[Message], names: SiteNames) -> dict[str, dict]:
    """The ledger head (seq, head, ledger key id) each replying site reported, by site name."""
    return {
        names(reply.metadata.src_node_id): dict(reply.content.config_records[LEDGER_HEAD])
        for reply in replies
        if not reply.has_error() and LEDGER_HEAD in reply.content.config_records
    }


def wait_for_sites(grid: Grid, count: int) -> None:
    """Block until ``count`` sites are connected.

    Flower's FedAvg sizes its sample (``fraction_train`` of the connected sites) *before* it
    waits for ``min_available_nodes``: a round configured while sites are still connecting
    would sample from none of them and take only ``min_train_nodes``. Waiting here first
    sizes the sample from at least ``count`` connected sites.
    """
    reported = None
    while (connected := len(list(grid.get_node_ids()))) < count:
        if connected != reported:  # one line per change, not one every poll
            log.info("waiting for sites to connect: %d of %d", connected, count)
            reported = connected
        time.sleep(2)


def _format(metrics: dict[str, float]) -> str:
    """Metrics for one console line, in fixed notation: the headline scores first, per-class
    sensitivities together, counts left to ``rounds.jsonl``."""
    shown = {k.removeprefix("val_").removeprefix("train_"): v for k, v in metrics.items()}
    headline = [k for k in ("loss", "acc", "auroc", "pneumonia_auroc", "min_sensitivity") if k in shown]
    classes = sorted(k for k in shown if k.startswith("sensitivity_"))
    rest = sorted(k for k in shown if k not in {*headline, *classes, NUM_EXAMPLES} and "support_" not in k)
    parts = [f"{k} {shown[k]:.3f}" for k in headline + rest]
    if classes:
        parts.append(
            "sensitivity " + " ".join(f"{k.removeprefix('sensitivity_')} {shown[k]:.2f}" for k in classes)
        )
    return "  ".join(parts)


class RecordingFedAvg(FedAvg):
    """:class:`flwr.serverapp.strategy.FedAvg` weighted by ``num-examples`` that logs every
    site's metrics and appends one JSON line per round to ``rounds_file``.

    A round in which fewer than ``min_train_nodes`` sites trained (failures, privacy budgets
    spent) raises :class:`TooFewSites` after it is recorded.

    Rounds are numbered for the whole run: a federation resumed after ``completed_rounds``
    (:mod:`pipeline.federation.resume`) counts Flower's rounds 1, 2, ... as
    ``completed_rounds + 1``, ... in the messages to the sites and in every record.

    The sites' average becomes the next global model through ``server_optimizer``
    (:mod:`pipeline.federation.server_optimizer`); evaluation metrics are pooled by
    :func:`pipeline.federation.selection.pooled_metrics` and ``selector`` keeps the best round
    (raising :class:`pipeline.federation.selection.EarlyStop` once it stops improving).
    """

    def __init__(
        self,
        rounds_file: Path,
        completed_rounds: int = 0,
        server_optimizer: ServerOptimizer | None = None,
        selector: RoundSelector | None = None,
        **kwargs,
    ) -> None:
        super().__init__(weighted_by_key=NUM_EXAMPLES, evaluate_metrics_aggr_fn=pooled_metrics, **kwargs)
        self.rounds_file = rounds_file
        self.completed_rounds = completed_rounds
        self.server_optimizer = server_optimizer or ServerOptimizer(None)
        self.selector = selector or RoundSelector(rounds_file.parent, None, None)
        self.names = SiteNames()
        self._sent: ArrayRecord | None = None
        self._round: dict = {}
        self._clock = time.perf_counter()

    def run_round(self, flower_round: int) -> int:
        """The round of the whole run that Flower's ``flower_round`` of this start is."""
        return self.completed_rounds + flower_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.check_stop()
        wait_for_sites(grid, self.min_available_nodes)
        self.names.refresh(grid)
        self._sent = arrays
        return super().configure_train(self.run_round(server_round), arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        wait_for_sites(grid, self.min_available_nodes)
        self.names.refresh(grid)
        return super().configure_evaluate(self.run_round(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        per_site = _site_metrics(replies, self.names)
        arrays, metrics = super().aggregate_train(server_round, replies)
        names = self.names
        failures = [f"{names(r.metadata.src_node_id)}: {r.error.reason}" for r in replies if r.has_error()]
        self.record_train(server_round, per_site, metrics, failures)
        if arrays is not None and self._sent is not None:
            arrays = self.server_optimizer.step(self.run_round(server_round), self._sent, arrays)
        return arrays, metrics

    def record_train(
        self,
        server_round: int,
        per_site: SiteMetrics,
        aggregated: MetricRecord | None,
        failures: Sequence[str | None] | None = None,
    ) -> None:
        """Log each site's training metrics and keep them (and the sites' refusals) for the
        round's record."""
        server_round = self.run_round(server_round)
        for node, metrics in per_site.items():
            log.info("round %d  site %s  train  %s", server_round, node, _format(metrics))
        self._round = {
            "round": server_round,
            "sites_trained": len(per_site),
            "train_per_site": per_site,
            "train": dict(aggregated or {}),
            "failures": list(failures or []),
        }
        if len(per_site) < self.min_train_nodes:
            self._write_round()
            raise TooFewSites(
                f"only {len(per_site)} sites trained in round {server_round} but "
                f"federation.min_sites={self.min_train_nodes}: the federation stops"
            )

    def aggregate_site_metrics(self, per_site: SiteMetrics) -> MetricRecord | None:
        """Example-weighted mean of the sites' scalar training metrics."""
        if not per_site:
            return None
        contents = [
            RecordDict({METRICS: MetricRecord(cast(dict[str, MetricRecordValues], m))})
            for m in per_site.values()
        ]
        return self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def record_failed_round(self, server_round: int, reason: str) -> None:
        """A round that released no aggregate: log why and record it."""
        server_round = self.run_round(server_round)
        log.error("round %d  no aggregate released: %s", server_round, reason)
        self._round = {"round": server_round, "sites_trained": 0, "failed": reason}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        per_site = _site_metrics(replies, self.names)
        heads = _ledger_heads(replies, self.names)
        record_heads(self.rounds_file.parent, self.run_round(server_round), heads)
        metrics = super().aggregate_evaluate(server_round, replies)
        run_round = self.run_round(server_round)
        pooled = cast(dict[str, float], dict(metrics or {}))  # pooled_metrics: scalars
        self._round.update({"val_per_site": per_site, "val": pooled, "ledger_heads": heads})
        log.info("round %d  validation (all sites)  %s", run_round, _format(pooled))
        warn_collapsed_classes(run_round, pooled)
        threshold = pooled_threshold([reply.content for reply in replies if not reply.has_error()])
        self._round["operating_threshold"] = threshold
        self.selector.consider(run_round, pooled, threshold)
        if self.selector.best is not None:
            self._round["selected_round"] = self.selector.best[0]
        if self.selector.should_stop():
            self._round["stopped_early"] = True
        self._write_round()
        return metrics

    def check_stop(self) -> None:
        """Raise :class:`EarlyStop` before a round once the selection stopped improving."""
        best_round = self.selector.best
        if best_round is not None and self.selector.should_stop():  # should_stop() needs a best round
            best = best_round[0]
            raise EarlyStop(
                f"{self.selector.metric} has not improved for {self.selector.patience} rounds "
                f"since round {best}: the run stops and releases round {best}"
            )

    def _write_round(self) -> None:
        """Append the round, with ``wall_s``: seconds since the previous round's record."""
        now = time.perf_counter()
        self._round["wall_s"] = round(now - self._clock, 3)
        self._clock = now
        self.rounds_file.parent.mkdir(parents=True, exist_ok=True)
        with self.rounds_file.open("a") as handle:
            handle.write(json.dumps(self._round) + "\n")
