"""The gate every message to a site passes first: an approved experiment, or nothing runs.

:func:`received_experiment` finds the experiment a message carries (in every config record that
holds one: they must all agree), checks it against the allow-list
(:mod:`pipeline.contracts.experiment`), applies the site's own policy, and requires the
site's data owner's approval of exactly that job, before any model is built or any data file is
opened. :func:`approval_gate` is the ClientApp-wide Flower mod that runs it for every message kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from flwr.app import Context, Message
from omegaconf import DictConfig

from pipeline.contracts.experiment import InvalidExperiment, experiment_from_yaml
from pipeline.contracts.layout import SitePaths, WorkDir
from pipeline.contracts.messages import CONFIG_KEY, PARTITION_ID, ROUND_KEY, RUN_ID_KEY, NodeConfig
from pipeline.federation.site_policy import SitePolicy
from pipeline.governance.approval import enforce_approval, site_governance


@dataclass(frozen=True)
class ReceivedExperiment:
    """The approved experiment a message carries, and where this site keeps its cache."""

    cfg: DictConfig
    cache_dir: Path
    run_id: str
    server_round: int
    policy: SitePolicy
    site_name: str


def received_experiment(message: Message, context: Context) -> ReceivedExperiment:
    """The message's experiment, checked against the allow-list and the site's approvals.

    Every config record that carries an experiment must carry the same one (and the same run and
    round); raises :class:`InvalidExperiment` or
    :class:`pipeline.governance.approval.JobNotApproved` otherwise.
    """
    carried = [dict(record) for record in message.content.config_records.values() if CONFIG_KEY in record]
    if not carried:
        raise InvalidExperiment(
            "the message carries no experiment: this site answers only "
            "messages of a job its data owner approved"
        )
    identity = {(str(r[CONFIG_KEY]), str(r.get(RUN_ID_KEY)), r.get(ROUND_KEY)) for r in carried}
    if len(identity) != 1:
        raise InvalidExperiment(
            "the message carries different experiments, runs or rounds in its records: refused"
        )
    text, run_id, carried_round = identity.pop()
    # An int from the coordinator (Flower's strategies, the SecAgg+ stamp of secure_aggregation).
    server_round = cast(int | None, carried_round)
    cfg = experiment_from_yaml(text)
    node_config = dict(context.node_config)
    cfg.governance = site_governance(node_config, cfg)
    site = NodeConfig.read(node_config)
    if site is not None and site.epsilon_budget is not None and "privacy" in cfg:
        # A deployed site may hold itself to a tighter budget than the coordinator proposes.
        cfg.privacy.epsilon_budget = min(site.epsilon_budget, float(cfg.privacy.epsilon_budget))
    rounds = int(cfg.federation.num_rounds)
    if not 1 <= int(server_round or 0) <= rounds:
        raise InvalidExperiment(
            f"round {server_round} is outside the approved job's rounds 1 to {rounds}: refused"
        )
    cache_dir = site_cache_dir(node_config, cfg)
    enforce_approval(cfg, WorkDir.of_cache(cache_dir).root)
    run = run_id if run_id != "None" else str(context.run_id)
    name = site.site_name if site is not None and site.site_name else WorkDir.of_cache(cache_dir).site_name
    return ReceivedExperiment(
        cfg, cache_dir, run, int(server_round or 0), SitePolicy.for_site(node_config, cfg), name
    )


def approval_gate(message: Message, context: Context, call_next) -> Message:
    """Refuse any message whose experiment this site has not approved (see the module docstring)."""
    received_experiment(message, context)
    return call_next(message, context)


def site_cache_dir(node_config: dict, cfg: DictConfig) -> Path:
    """The cache folder, at the experiment's image size, of the site running this ClientApp.

    A deployed SuperNode names its work folder (:class:`NodeConfig`); a simulated one maps its
    ``partition-id`` to ``cfg.data.sites``.
    """
    size = int(cfg.data.image_size)
    site = NodeConfig.read(node_config)
    if site is not None:
        return WorkDir(site.work_dir).cache(size)
    if PARTITION_ID not in node_config:
        key = NodeConfig.KEYS["work_dir"]
        raise KeyError(
            f"this SuperNode has no '{key}' in its node config: start it with scripts/site.py, "
            f"or --node-config \"{key}='/path/to/site/fedrad'\""
        )
    index = int(node_config[PARTITION_ID])
    names = list(cfg.data.sites)
    if index >= len(names):
        raise IndexError(f"partition-id {index} but data.sites lists only {names}")
    subdir = str(cfg.data.get("input_subdir") or "dicom")
    return SitePaths.under(cfg.data.sites_root, names[index], subdir).cache(size)
