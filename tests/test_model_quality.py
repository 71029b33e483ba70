"""The training recipe: class balancing, best-round selection, server optimisers (also under
SecAgg+), FedProx, frozen layers, the learning-rate schedule and public pretraining, on the demo
sites' real chest X-rays."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from torch.nn import functional as F

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.contracts.layout import SitePaths
from pipeline.federation.selection import MIN_SENSITIVITY, pooled_metrics, warn_collapsed_classes
from pipeline.federation.server_app import run_federation
from pipeline.federation.site_task import train_site
from pipeline.governance.rounds import state_sha256
from pipeline.governance.site_ledger import SiteLedger
from pipeline.support.flower_grid import LoopbackGrid
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.classifier import balanced_class_weights
from pipeline.training.loop import build_classifier, lr_factor
from pipeline.training.pretraining import pretrain
from tests.conftest import FAST_FEDERATION, compose_config, DEMO_IMAGE_SIZE


@pytest.fixture
def sites_root(demo_sites, tmp_path) -> Path:
    """Private copies of the demo sites' caches (their own ledgers and releases)."""
    for site in demo_sites.sites:
        shutil.copytree(site.cache(DEMO_IMAGE_SIZE), SitePaths.under(tmp_path, site.name).cache(DEMO_IMAGE_SIZE))
    return tmp_path


def federation(root: Path, rounds: int, *overrides: str):
    return compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={root}",
        "data.sites=[site1,site2,site3]",
        f"federation.num_rounds={rounds}",
        "federation.min_sites=3",
        "data.augment.prob=0",
        *overrides,
    )


def test_balanced_weights_give_every_present_class_the_same_mass(demo_sites):
    for site in demo_sites.sites:
        labels = torch.from_numpy(SiteCache(site.cache(DEMO_IMAGE_SIZE)).load_split("train").labels.astype(np.int64))
        weights = balanced_class_weights(labels)
        masses = [float(weights[c] * (labels == c).sum()) for c in range(len(CLASS_NAMES))]
        assert masses == pytest.approx([len(labels) / 3] * 3)
        assert float(weights[labels].mean()) == pytest.approx(1.0)
    assert balanced_class_weights(torch.tensor([0, 0, 2])).tolist() == pytest.approx([0.75, 0.0, 1.5])


def test_the_weighted_loss_is_the_balanced_cross_entropy(demo_sites):
    cfg = compose_config(*FAST_FEDERATION, "model.class_balance=true")
    split = SiteCache(demo_sites.sites[1].cache(DEMO_IMAGE_SIZE)).load_split("train")
    classifier = build_classifier(cfg, seed=0, train_labels=split.labels)
    images, labels = torch.from_numpy(split.images[:16]), torch.from_numpy(split.labels[:16]).long()
    expected = (
        F.cross_entropy(classifier.net(images), labels, reduction="none") * classifier.class_weights[labels]
    ).mean()
    classifier.log = lambda *args, **kwargs: None  # outside a Trainer
    assert float(classifier.training_step((images, labels), 0)) == pytest.approx(float(expected))
    plain = compose_config(*FAST_FEDERATION, "model.class_balance=false")
    unweighted = build_classifier(plain, seed=0, train_labels=split.labels)
    assert unweighted.class_weights is None


def test_pooled_sensitivity_is_the_federations_own_and_collapse_is_warned(caplog):
    sites = [
        {
            "val_sensitivity_viral": 0.0,
            "val_support_viral": 10.0,
            "val_sensitivity_normal": 1.0,
            "val_support_normal": 2.0,
            "val_auroc": 0.6,
            "num-examples": 12.0,
        },
        {
            "val_sensitivity_viral": 1.0,
            "val_support_viral": 30.0,
            "val_sensitivity_normal": 0.5,
            "val_support_normal": 6.0,
            "val_auroc": 0.8,
            "num-examples": 36.0,
        },
    ]
    pooled = dict(pooled_metrics([RecordDict({"m": MetricRecord(s)}) for s in sites], "num-examples"))
    assert pooled["val_sensitivity_viral"] == pytest.approx(30 / 40)  # true positives / images
    assert pooled["val_sensitivity_normal"] == pytest.approx((2 + 3) / 8)
    assert pooled["val_auroc"] == pytest.approx((0.6 * 12 + 0.8 * 36) / 48)
    assert pooled[MIN_SENSITIVITY] == pytest.approx(5 / 8)
    assert pooled["val_support_viral"] == 40
    assert warn_collapsed_classes(3, {"val_sensitivity_viral": 0.0, "val_support_viral": 5.0}) == ["viral"]
    assert "sensitivity for viral is 0" in caplog.text


def test_the_best_round_is_released_and_a_stalled_run_stops(sites_root, tmp_path):
    out = tmp_path / "run"
    run_federation(LoopbackGrid(partitions=3), federation(sites_root, 3), out)
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val"]["val_auroc"])["round"]
    selection = json.loads((out / "selection.json").read_text())
    threshold = records[best - 1]["operating_threshold"]
    assert selection == {
        "round": best,
        "metric": "val_auroc",
        "value": pytest.approx(records[best - 1]["val"]["val_auroc"]),
        "operating_threshold": threshold["value"],
    }
    released, extras = load_checkpoint(out / "model.pt")
    chosen, _ = load_checkpoint(out / "checkpoints" / f"round_{best:03d}.pt")
    assert released.keys() == chosen.keys()
    assert all(torch.equal(released[k], chosen[k]) for k in chosen)
    assert extras["operating_threshold"] == threshold  # the threshold travels with the model
    assert all(r["selected_round"] <= r["round"] for r in records)
    for record in records:  # per-class sensitivity is reported every round
        assert {f"val_sensitivity_{c}" for c in CLASS_NAMES} <= set(record["val"])

    # A metric that cannot improve (the validation images of a class): round 1 stays the best
    # and, with patience 1, the run stops after round 2 and a rerun trains no more.
    stalled = tmp_path / "stalled"
    cfg = federation(
        sites_root, 4, "federation.selection.metric=val_support_normal", "federation.selection.patience=1"
    )
    run_federation(LoopbackGrid(partitions=3), cfg, stalled)
    run_federation(LoopbackGrid(partitions=3), cfg, stalled)
    records = [json.loads(line) for line in (stalled / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and records[-1]["stopped_early"]
    assert json.loads((stalled / "selection.json").read_text())["round"] == 1


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimisers_act_on_the_secure_aggregate(sites_root, tmp_path, optimizer):
    def first_round(*overrides: str) -> dict[str, torch.Tensor]:
        out = tmp_path / "_".join(overrides).replace("=", "-").replace(".", "-")
        cfg = federation(sites_root, 1, "federation.selection.metric=null", *overrides)
        run_federation(LoopbackGrid(partitions=3), cfg, out)
        return load_checkpoint(out / "checkpoints" / "round_001.pt")[0]

    chosen = (f"federation.server_optimizer.name={optimizer}", "federation.server_optimizer.server_lr=0.01")
    plain = first_round(*chosen)
    secure = first_round(*chosen, "federation.secure_aggregation=true")
    averaged = first_round()
    for key in plain:
        torch.testing.assert_close(secure[key], plain[key], atol=2e-4, rtol=0)
    assert any((plain[k] - averaged[k]).abs().max() > 1e-3 for k in plain)  # the optimiser acted


def test_fedprox_keeps_the_update_near_the_global_model(sites_root):
    site = SitePaths.under(sites_root, "site1")

    def distance(*overrides: str, run: str) -> float:
        cfg = federation(sites_root, 1, *overrides)
        start = build_classifier(cfg, seed=0).net.state_dict()
        update, _ = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), start, 1, run)
        return float(sum((update[k].float() - start[k].float()).norm() ** 2 for k in start) ** 0.5)

    assert distance("federation.proximal_mu=100.0", run="prox") < 0.8 * distance(run="plain")


def test_frozen_layers_stay_as_received(sites_root):
    """model.freeze: a site's update leaves the named parameters exactly as the global model."""
    site = SitePaths.under(sites_root, "site1")
    cfg = federation(sites_root, 1, "model.freeze=[features]")
    start = build_classifier(cfg, seed=0).net.state_dict()
    update, _ = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), start, 1, "frozen")
    weights = [k for k in start if k.endswith((".weight", ".bias"))]
    frozen = [k for k in weights if k.startswith("features")]
    assert frozen and all(torch.equal(update[k], start[k]) for k in frozen)
    assert any(not torch.equal(update[k], start[k]) for k in weights if k.startswith("classifier"))


def test_cosine_schedule_runs_from_the_base_rate_to_the_final_factor():
    fed = compose_config(
        "federation.num_rounds=5", "federation.lr_schedule=cosine", "federation.lr_final_factor=0.1"
    ).federation
    factors = [lr_factor(fed, r) for r in range(1, 6)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert lr_factor(compose_config().federation, 3) == 1.0


def test_pretraining_on_public_images_starts_the_federation(demo_sites, sites_root, tmp_path):
    """Demo site 3's real images play the public set; sites 1 and 2 federate from its weights."""
    public = demo_sites.sites[2]
    weights = tmp_path / "pretrain" / "pretrained.pt"
    cfg = compose_config(
        *FAST_FEDERATION,
        f"pretrain.input_dir={public.input_dir}",
        f"pretrain.labels_csv={public.labels_csv}",
        f"pretrain.work_dir={tmp_path / 'pretrain'}",
        "pretrain.epochs=3",
        "model.class_balance=true",
        "data.augment.prob=0",
    )
    output, metrics = pretrain(cfg)
    assert output == weights and metrics["num-examples"] > 0  # scored on the public set's own val
    pretrained, _ = load_checkpoint(weights)

    # it trained: the weights moved away from the network it started from
    initial = build_classifier(cfg, seed=int(cfg.seed), load_pretrained=False).net.state_dict()
    assert any(not torch.equal(pretrained[k], initial[k]) for k in initial)
    assert set(metrics) >= {"val/loss", "val/auroc", "val/pneumonia_auroc"}
    assert all(math.isfinite(v) for v in metrics.values())

    out = tmp_path / "run"
    fed = federation(
        sites_root, 1, f"model.weights_path={weights}", "data.sites=[site1,site2]", "federation.min_sites=2"
    )
    run_federation(LoopbackGrid(partitions=2), fed, out)
    for name in ("site1", "site2"):
        [entry] = [
            e
            for e in SiteLedger.for_site(SitePaths.under(sites_root, name).work_dir).entries()
            if e["kind"] == "round"
        ]
        assert entry["body"]["global_model_sha256"] == state_sha256(pretrained)


def test_a_site_reported_name_is_shown_only_when_plain_and_not_taken():
    from pipeline.federation.strategy import SiteNames

    names = SiteNames()
    names.reported(1, "site1")
    names.reported(2, "site1")  # another node claiming the same name keeps its node id
    names.reported(3, "evil\nname")
    names.reported(4, "x" * 65)
    assert [names(n) for n in (1, 2, 3, 4)] == ["site1", "2", "3", "4"]
