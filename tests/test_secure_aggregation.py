"""SecAgg+: settings from the number of sites, the quantisation bound, and whole rounds of the
real ServerApp and ClientApp over an in-process grid, with sites dropping out."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.layout import SitePaths
from pipeline.federation.allocator import keep_large_blocks
from pipeline.federation.server_app import run_federation
from pipeline.federation.site_task import train_site
from pipeline.governance.budget import PrivacyLedger
from pipeline.privacy.secagg import MODULUS_RANGE, SecAggSettings
from pipeline.support.flower_grid import LoopbackGrid
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.loop import build_classifier
from tests.conftest import FAST_FEDERATION, compose_config, DEMO_IMAGE_SIZE


def settings_for(num_sites: int, *overrides: str) -> SecAggSettings:
    cfg = compose_config(*overrides)
    return SecAggSettings.from_config(cfg.federation, num_sites)


def test_defaults_follow_the_number_of_sites():
    three, five = settings_for(3), settings_for(5)
    assert (three.num_shares, three.reconstruction_threshold) == (3, 2)
    assert (five.num_shares, five.reconstruction_threshold) == (5, 3)
    for sites, settings in ((3, three), (5, five)):
        assert sites * settings.quantization_range < MODULUS_RANGE
        assert 2 * sites * settings.quantization_range >= MODULUS_RANGE  # the largest that fits
    with pytest.raises(ValueError, match="at least 3 sites"):
        settings_for(2)
    with pytest.raises(ValueError, match="overflows"):
        settings_for(5, "federation.secagg.quantization_range=1073741824")


def test_quantisation_error_within_the_stated_bound():
    """Flower's own quantise / weight / sum / dequantise arithmetic, without the masks (which
    cancel exactly modulo 2**32), stays within ``error_bound`` even at the clipping range."""
    settings = settings_for(3)
    counts = [57, 130, 241]
    rng = np.random.default_rng(0)
    c, T = settings.clipping_range, settings.quantization_range
    params = [rng.uniform(-c, c, size=20_000) for _ in counts]
    params[0][:100] = c  # extreme values
    params[1][:100] = -c
    total = None
    for n, p in zip(counts, params):  # as flwr.client.mod.secaggplus_mod does
        q = settings.weight(n)
        vector = factor_combine(q, quantize([p * (q / T)], c, T))
        total = vector if total is None else [a + b for a, b in zip(total, vector)]
    q_total, summed = factor_extract(total)  # as SecAggPlusWorkflow.unmask_stage does
    average = dequantize(summed, c, T)[0] - (len(counts) - 1) * c
    average *= T / q_total
    exact = sum(n * p for n, p in zip(counts, params)) / sum(counts)
    error = np.abs(average - exact).max()
    bound = settings.error_bound(counts)
    assert error <= bound
    assert error > bound / 1000  # the bound is not vacuous


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_model_sized_arrays_stay_in_the_heap():
    def churn() -> None:  # eight 8 MiB temporaries, written and freed, as in masking
        arrays = [np.ones(2**20) for _ in range(8)]
        del arrays

    assert keep_large_blocks()
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2**20 * 8 // 4096  # fewer than one array's pages (glibc's default: ~40 000)


def test_site_refuses_to_send_what_would_be_clipped():
    settings = settings_for(3)
    with pytest.raises(ValueError, match="clipping_range"):
        settings.check_site_update(100, largest_magnitude=9.0)
    with pytest.raises(ValueError, match="max_weight"):
        settings.check_site_update(20_000, largest_magnitude=1.0)


@pytest.fixture(scope="module")
def five_site_rounds(demo_sites, tmp_path_factory):
    """Five sites (partitions 3 and 4 reuse sites 1 and 2), reconstruction threshold 3, three
    rounds: partitions 3 and 4 fail in round 1, partitions 2, 3 and 4 in round 2."""
    cfg = compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={demo_sites.root}",
        "data.sites=[site1,site2,site3,site1,site2]",
        "federation.num_rounds=3",
        "federation.secure_aggregation=true",
        "federation.fraction_evaluate=0.0",
        "federation.min_sites=3",
    )
    out = tmp_path_factory.mktemp("secagg_rounds")
    grid = LoopbackGrid(partitions=5, dropouts={1: [3, 4], 2: [2, 3, 4]})
    torch.set_num_threads(1)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fedrad.federation").addHandler(handler)
    try:
        run_federation(grid, cfg, out)
    finally:
        logging.getLogger("fedrad.federation").removeHandler(handler)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return cfg, out, grid, rounds, [r.getMessage() for r in records]


@pytest.mark.slow
def test_round_with_two_dropouts_releases_the_survivors_fedavg(five_site_rounds, demo_sites):
    cfg, out, _, rounds, _ = five_site_rounds
    assert rounds[0]["sites_trained"] == 3
    initial = build_classifier(cfg, seed=int(cfg.seed)).net.state_dict()
    updates, counts = [], []
    for site in demo_sites.sites:  # partitions 0, 1, 2 survive round 1
        state, metrics = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial, server_round=1, run_id=f"check-{uuid4()}")
        updates.append(state)
        counts.append(int(metrics["num-examples"]))
    assert counts == [len(SiteCache(s.cache(DEMO_IMAGE_SIZE)).load_split("train").labels) for s in demo_sites.sites]
    settings = SecAggSettings.from_config(cfg.federation, 5)
    bound = settings.error_bound(counts) + settings.clipping_range * 2.0**-24
    aggregated, _ = load_checkpoint(out / "checkpoints" / "round_001.pt")
    worst = 0.0
    for key in initial:
        expected = sum(n * u[key].double() for n, u in zip(counts, updates)) / sum(counts)
        worst = max(worst, float((aggregated[key].double() - expected).abs().max()))
    assert worst <= bound, f"max |secure - FedAvg| = {worst:.3g} > bound {bound:.3g}"


@pytest.mark.slow
def test_coordinator_never_receives_a_site_update(five_site_rounds):
    _, _, grid, _, _ = five_site_rounds
    answered = [r for kind, _, r in grid.replies if kind == "train" and not r.has_error()]
    assert answered
    for reply in answered:  # every training reply: keys, shares or a masked vector only
        assert all(len(record) == 0 for record in reply.content.array_records.values())


@pytest.mark.slow
def test_round_with_three_dropouts_fails_cleanly_and_the_next_runs(five_site_rounds):
    _, out, _, rounds, messages = five_site_rounds
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "threshold 3" in rounds[1]["failed"] and rounds[1]["sites_trained"] == 0
    assert not (out / "checkpoints" / "round_002.pt").exists()  # nothing released
    assert any("round 2  no aggregate released" in m for m in messages)
    assert rounds[2]["sites_trained"] == 5
    assert (out / "checkpoints" / "round_003.pt").is_file()


@pytest.mark.slow
def test_secagg_and_dp_sgd_together_report_each_sites_epsilon(demo_sites, tmp_path):
    """The demo_private preset (SecAgg+ and DP-SGD) on copies of the demo sites, small CNN:
    every round releases an aggregate, every site reports its cumulative epsilon beside the
    masked vector, and each site's ledger on its own disk holds the same figure."""
    for site in demo_sites.sites:
        shutil.copytree(site.cache(DEMO_IMAGE_SIZE), SitePaths.under(tmp_path, site.name).cache(DEMO_IMAGE_SIZE))
    cfg = compose_config(
        "experiment=demo_private",
        "model=small_cnn",
        f"data.sites_root={tmp_path}",
        "federation.num_rounds=2",
        "federation.fraction_evaluate=0.0",
        "privacy.noise_multiplier=1.0",
        "privacy.epsilon_budget=1000",
    )
    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_federation(LoopbackGrid(partitions=3), cfg, out)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["sites_trained"] for r in rounds] == [3, 3]
    epsilons = [sorted(m["epsilon"] for m in r["train_per_site"].values()) for r in rounds]
    assert all(0 < first < second for first, second in zip(*epsilons))  # spent, and growing
    reported = sorted((m["delta"], m["epsilon"]) for m in rounds[-1]["train_per_site"].values())
    ledgers = []
    for site in demo_sites.sites:
        cache = SitePaths.under(tmp_path, site.name).cache(DEMO_IMAGE_SIZE)
        delta = 1.0 / (10 * len(SiteCache(cache).load_split("train").labels))  # privacy.delta: null
        ledgers.append((delta, PrivacyLedger.for_cache(cache, "rdp").spent(delta)))
    assert [d for d, _ in sorted(ledgers)] == pytest.approx([d for d, _ in reported])
    assert [e for _, e in sorted(ledgers)] == pytest.approx([e for _, e in reported], rel=1e-6)
    assert load_checkpoint(out / "model.pt")[1]["round"] == 2
