"""Flower federation: what a site sends, how the coordinator averages, the demo end to end."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.experiment import experiment_yaml
from pipeline.contracts.messages import CONFIG_KEY
from pipeline.federation.client_app import app as client_app
from pipeline.federation.site_task import train_site
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.loop import build_classifier
from tests.conftest import FAST_FEDERATION, compose_config, DEMO_IMAGE_SIZE


def fast_config(sites_root: Path, *overrides: str):
    return compose_config(*FAST_FEDERATION, f"data.sites_root={sites_root}", *overrides)


def test_site_reply_holds_only_parameters_count_scalars_and_its_name(demo_sites, planted_identifiers, monkeypatch):
    # Outside a Flower runtime, say which run this process serves (as the SuperNode does).
    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    cfg = fast_config(demo_sites.root)
    torch.manual_seed(0)
    state = build_classifier(cfg, seed=0).net.state_dict()
    message = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(state),
                "config": ConfigRecord({CONFIG_KEY: experiment_yaml(cfg), "server-round": 1}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client_app(message, context)

    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    # Besides parameters and scalars, only the site's own name (its data.sites entry here), by
    # which the coordinator logs it where no name was registered for its key.
    assert {k: dict(v) for k, v in content.config_records.items()} == {"site": {"name": "site1"}}
    arrays = content["arrays"]
    assert list(arrays.keys()) == list(state.keys())
    for key, tensor in state.items():
        assert tuple(arrays[key].shape) == tuple(tensor.shape), key
    metrics = dict(content["metrics"])
    train_split = SiteCache(demo_sites.sites[0].cache(DEMO_IMAGE_SIZE)).load_split("train")
    assert metrics["num-examples"] == len(train_split.labels)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # No planted identifier of any site appears anywhere in what is sent back.
    payload = b"".join(a.data for a in arrays.values()) + repr(metrics).encode()
    for value in planted_identifiers:
        assert value.encode() not in payload


@pytest.mark.slow
def test_demo_runs_end_to_end(demo_run):
    assert (demo_run / "model.pt").is_file()
    assert (demo_run / "checkpoints" / "round_001.pt").is_file()
    rounds = [json.loads(line) for line in (demo_run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["sites_trained"] == 3
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert 0.0 <= metrics["pneumonia_auroc"] <= 1.0
    assert (demo_run / "roc.png").is_file() and (demo_run / "confusion_matrix.png").is_file()
    assert "round 1" in (demo_run / "stdout.txt").read_text()


@pytest.mark.slow
def test_federated_round_is_example_weighted_average(demo_run, demo_sites):
    cfg = fast_config(demo_sites.root, "federation.num_rounds=1")
    torch.set_num_threads(1)
    initial = build_classifier(cfg, seed=int(cfg.seed)).net.state_dict()
    updates, weights = [], []
    for site in demo_sites.sites:
        state, metrics = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial, server_round=1, run_id=f"check-{uuid4()}")
        updates.append(state)
        weights.append(metrics["num-examples"])
    assert len(set(weights)) > 1, "sites should differ in size for this test to mean something"
    total = float(sum(weights))
    aggregated, _ = load_checkpoint(demo_run / "checkpoints" / "round_001.pt")
    for key in initial:
        expected = sum(w / total * u[key].double() for w, u in zip(weights, updates))
        np.testing.assert_allclose(
            aggregated[key].double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5, err_msg=key
        )
