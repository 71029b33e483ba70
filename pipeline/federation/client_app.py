"""A site's Flower ClientApp: adapts Flower messages to :mod:`pipeline.federation.site_task`.

Every message, of every kind (training, evaluation, each SecAgg+ stage, anything added later),
first passes :func:`approval_gate`: the experiment it carries must be one this site's data owner
approved, and must name only components on the site's allow-list
(:mod:`pipeline.contracts.experiment`), before any model is built or any data file is
opened. A message whose records carry two different experiments is refused.

The reply to a training message holds exactly three things: the updated model parameters
(arrays with the model's own shapes), the number of training examples, and scalar metrics.
No pixel, no identifier and no file name leaves the site. Under secure aggregation
(:mod:`pipeline.federation.secure_aggregation`) the same handler runs inside Flower's SecAgg+
mod, which masks the parameters before they leave, and a job that requires secure aggregation
is never answered in the clear; under DP-SGD the metrics include the site's cumulative
``epsilon``, and a site whose budget is spent replies with an error. The reply to an evaluation
message holds scalar metrics, the head of the site's ledger
(:mod:`pipeline.governance.heads`), which the coordinator keeps, and how many of its validation
images with and without pneumonia the model calls pneumonia at each threshold of a fixed grid
(:mod:`pipeline.evaluation.threshold`), from which the coordinator chooses the model's threshold.

Deployed, a site runs this app for every message inside its own long-lived process
(:mod:`pipeline.deployment.warm_runtime`), never a ClientApp named by the coordinator. The
training stack (Lightning, MONAI, Opacus) is imported by the handlers that train or evaluate,
not by the three SecAgg+ stages that only exchange keys, shares and masks.
"""

from __future__ import annotations

from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues, MetricRecordValues
from flwr.clientapp import ClientApp

from pipeline.contracts.console import quiet_third_party
from pipeline.contracts.experiment import InvalidExperiment
from pipeline.contracts.layout import WorkDir
from pipeline.contracts.messages import (
    ARRAYS,
    LEDGER_HEAD,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    SITE_NAME,
    THRESHOLD_COUNTS,
)
from pipeline.federation.releases import MASKING_NEIGHBOURS
from pipeline.federation.secure_aggregation import secure_aggregation_mod
from pipeline.federation.site_gate import approval_gate, received_experiment

quiet_third_party()  # a site's console shows fedrad's lines; the trainer quiets Lightning again

app = ClientApp(mods=[approval_gate])


def _metric_record(metrics: dict[str, float], num_examples: int) -> MetricRecord:
    """Scalar metrics with Flower-friendly keys and the aggregation weight."""
    record: dict[str, MetricRecordValues] = {
        key.replace("/", "_"): float(value) for key, value in metrics.items()
    }
    record[NUM_EXAMPLES] = int(num_examples)
    return MetricRecord(record)


def _site_record(name: str) -> ConfigRecord:
    """The site's own name (the coordinator prefers the name it registered the site under)."""
    return ConfigRecord({SITE_NAME: name})


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    """Train the received global model locally and reply with the update."""
    from pipeline.federation.site_task import train_site

    received = received_experiment(message, context)
    cfg = received.cfg
    if cfg.federation.get("secure_aggregation") and MASKING_NEIGHBOURS.get() is None:
        raise InvalidExperiment(
            "this job requires secure aggregation (SecAgg+): the site does not send its update in the clear"
        )
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    state = cast(ArrayRecord, message.content[ARRAYS]).to_torch_state_dict()
    new_state, metrics = train_site(
        cfg, received.cache_dir, state, received.server_round, received.run_id, received.policy
    )
    num_examples = int(metrics.pop(NUM_EXAMPLES))
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(new_state),
            METRICS: _metric_record(metrics, num_examples),
            SITE: _site_record(received.site_name),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split; the reply also
    carries the head of the site's ledger (``ledger``: seq, head, key id) and the validation
    threshold counts, in the clear."""
    from pipeline.federation.site_task import evaluate_round

    received = received_experiment(message, context)
    torch.set_num_threads(max(1, int(received.cfg.federation.client_cpus)))
    state = cast(ArrayRecord, message.content[ARRAYS]).to_torch_state_dict()
    metrics, head, counts = evaluate_round(
        received.cfg, received.cache_dir, state, received.server_round, received.run_id
    )
    metrics = dict(metrics)
    num_examples = int(metrics.pop(NUM_EXAMPLES))
    content = RecordDict(
        {
            METRICS: _metric_record(metrics, num_examples),
            LEDGER_HEAD: ConfigRecord(cast(dict[str, ConfigRecordValues], head)),
            THRESHOLD_COUNTS: ConfigRecord(cast(dict[str, ConfigRecordValues], counts)),
            SITE: _site_record(received.site_name),
        }
    )
    return Message(content=content, reply_to=message)


@app.query("finished")
def finished(message: Message, context: Context) -> Message:
    """The coordinator's last message of a run: the site records that its federation is
    finished (``scripts/site.py`` then stops, unless configured to keep serving)."""
    received = received_experiment(message, context)
    marker = WorkDir.of_cache(received.cache_dir).federation_finished
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{received.run_id}\n")
    return Message(content=RecordDict({SITE: _site_record(received.site_name)}), reply_to=message)
