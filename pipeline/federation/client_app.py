"""A site's Flower ClientApp: adapts Flower messages to :mod:`pipeline.federation.site_task`.

The reply to a training message holds exactly three things: the updated model parameters
(arrays with the model's own shapes), the number of training examples, and scalar metrics.
No pixel, no identifier and no file name leaves the site. Under secure aggregation
(:mod:`pipeline.federation.secure_aggregation`) the same handler runs inside Flower's SecAgg+
mod, which masks the parameters before they leave; under DP-SGD the metrics include the
site's cumulative ``epsilon``, and a site whose budget is spent replies with an error.
The reply to an evaluation message holds scalar metrics and the head of the site's ledger
(:mod:`pipeline.governance.heads`), which the coordinator keeps.

Deployed, every message runs in a fresh process that imports this module: the training stack
(Lightning, MONAI, Opacus) is imported only by the handlers that train or evaluate, not by the
three SecAgg+ stages that only exchange keys, shares and masks.
"""

from __future__ import annotations

import logging
import warnings

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pipeline.federation.run_config import (
    CONFIG_KEY,
    RUN_ID_KEY,
    experiment_from_yaml,
    site_cache_dir,
)
from pipeline.federation.secure_aggregation import secure_aggregation_mod
from pipeline.governance.rounds import evaluation_head
from pipeline.governance.approval import site_governance

app = ClientApp()

# A site's console shows Flower's round messages, not Lightning's start-up chatter.
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _metric_record(metrics: dict[str, float], num_examples: int) -> MetricRecord:
    """Scalar metrics with Flower-friendly keys and the aggregation weight."""
    record = {key.replace("/", "_"): float(value) for key, value in metrics.items()}
    record["num-examples"] = int(num_examples)
    return MetricRecord(record)


def _unpack(message: Message, context: Context):
    """The experiment config, this site's cache folder and the global model's state."""
    config = message.content["config"]
    cfg = experiment_from_yaml(str(config[CONFIG_KEY]))
    cfg.governance = site_governance(dict(context.node_config), cfg)
    if "epsilon-budget" in context.node_config and "privacy" in cfg:
        # A deployed site may hold itself to a tighter budget than the coordinator proposes.
        budget = min(float(context.node_config["epsilon-budget"]), float(cfg.privacy.epsilon_budget))
        cfg.privacy.epsilon_budget = budget
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    cache_dir = site_cache_dir(dict(context.node_config), cfg)
    state = message.content["arrays"].to_torch_state_dict()
    return cfg, cache_dir, state, int(config["server-round"])


class SimulatedDropout(RuntimeError):
    """Raised by ``federation.test_only_dropout``: a site failing mid-round, for tests."""


def _test_only_dropout(cfg, context: Context, server_round: int) -> None:
    """Fail this site in the rounds listed by ``federation.test_only_dropout`` (tests only)."""
    dropouts = cfg.federation.get("test_only_dropout") or {}
    partition = context.node_config.get("partition-id")
    if partition in dropouts.get(f"round_{server_round}", []):
        raise SimulatedDropout(f"test-only dropout of partition {partition} in round {server_round}")


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    """Train the received global model locally and reply with the update."""
    from pipeline.federation.site_task import train_site

    cfg, cache_dir, state, server_round = _unpack(message, context)
    _test_only_dropout(cfg, context, server_round)
    run_id = str(message.content["config"].get(RUN_ID_KEY, context.run_id))
    new_state, metrics = train_site(cfg, cache_dir, state, server_round, run_id)
    num_examples = int(metrics.pop("num-examples"))
    content = RecordDict(
        {"arrays": ArrayRecord(new_state), "metrics": _metric_record(metrics, num_examples)}
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split; the reply also
    carries the head of the site's ledger (``ledger``: seq, head, key id), in the clear."""
    from pipeline.federation.site_task import evaluate_site

    cfg, cache_dir, state, server_round = _unpack(message, context)
    metrics = evaluate_site(cfg, cache_dir, state, split="val")
    num_examples = int(metrics.pop("num-examples"))
    run_id = str(message.content["config"].get(RUN_ID_KEY, context.run_id))
    head = evaluation_head(cache_dir.parent, run_id, server_round, state)
    content = RecordDict(
        {"metrics": _metric_record(metrics, num_examples), "ledger": ConfigRecord(head)}
    )
    return Message(content=content, reply_to=message)
