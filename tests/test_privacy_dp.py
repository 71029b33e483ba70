"""DP-SGD: per-sample clipping against Opacus, noise, seeds, epsilon and the privacy ledger."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.nn import functional as F

from models.resnet import resnet18
from models.small_cnn import SmallCNN
from pipeline.contracts.cache import SiteCache
from pipeline.federation.site_task import train_site
from pipeline.governance.budget import PrivacyBudgetExhausted, PrivacyLedger
from pipeline.privacy.clipping import PerSampleClipper
from pipeline.privacy.dp import PrivateTraining, RoundPlan, check_dp_compatible
from pipeline.privacy.randomness import SecureRandom
from pipeline.training.loop import build_classifier
from tests.conftest import DEMO_IMAGE_SIZE, dp_config

NETS = {
    "small_cnn": (lambda: SmallCNN(width=8), 16),
    # 32 px: the early convolutions take the per-sample path, the late ones the ghost norm.
    "resnet18_groupnorm": (lambda: resnet18(norm="group", groups=8, inplace=False), 32),
}


def opacus_per_sample_grads(net: torch.nn.Module, images, labels) -> list[torch.Tensor]:
    """Reference per-sample gradients from Opacus's hooks mode, in double precision."""
    reference = GradSampleModule(net)
    F.cross_entropy(reference(images), labels).backward()
    grads = [p.grad_sample.detach().clone() for p in net.parameters()]
    reference._close()
    return grads


@pytest.mark.parametrize("name", NETS)
def test_per_sample_clipping_matches_opacus_and_is_bounded(name):
    make, size = NETS[name]
    torch.manual_seed(0)
    net = make().double()
    images, labels = torch.randn(4, 1, size, size, dtype=torch.float64), torch.arange(4) % 3
    per_sample = opacus_per_sample_grads(net, images, labels)
    norms = torch.cat([g.flatten(1) for g in per_sample], 1).norm(dim=1)
    clip = float(norms.median())
    net.zero_grad(set_to_none=True)
    clipper = PerSampleClipper(net, clip)
    measured = clipper.backward(F.cross_entropy(net(images), labels))
    torch.testing.assert_close(measured, norms, rtol=1e-9, atol=0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = [g * factors.view(-1, *[1] * (g.dim() - 1)) for g in per_sample]
    clipped_norms = torch.cat([c.flatten(1) for c in clipped], 1).norm(dim=1)
    assert bool((clipped_norms <= clip * (1 + 1e-9)).all())
    assert bool((norms > clip).any()), "some examples should need clipping"
    for param, contributions in zip(net.parameters(), clipped):
        torch.testing.assert_close(param.grad, contributions.sum(0), rtol=1e-9, atol=1e-12)


def test_per_sample_clipping_under_bf16_autocast_runs_in_full_precision():
    """Mixed precision (bf16 autocast, as on a GPU): the forward runs in bf16, the per-sample
    norms and the clipped sum in the parameters' float32, close to a float32 pass."""
    make, size = NETS["resnet18_groupnorm"]
    torch.manual_seed(0)
    net = make()
    images, labels = torch.randn(4, 1, size, size), torch.arange(4) % 3
    clipper = PerSampleClipper(net, 1.0)
    exact = clipper.backward(F.cross_entropy(net(images), labels))
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images)
        assert logits.dtype == torch.bfloat16
        mixed = clipper.backward(F.cross_entropy(logits, labels))
    assert mixed.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in net.parameters())
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0)
    total = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert float(total) <= len(labels) * 1.0 * (1 + 1e-6)  # a sum of clipped per-sample gradients

def test_noise_zero_equals_clipped_sgd():
    torch.manual_seed(1)
    net = SmallCNN(width=8).double()
    images, labels = torch.randn(8, 1, 16, 16, dtype=torch.float64), torch.arange(8) % 3
    per_sample = opacus_per_sample_grads(net, images, labels)
    norms = torch.cat([g.flatten(1) for g in per_sample], 1).norm(dim=1)
    before = [p.detach().clone() for p in net.parameters()]
    plan = RoundPlan(noise_multiplier=0.0, sample_rate=0.25, steps=1, delta=1e-5, expected_batch_size=8)
    private = PrivateTraining(plan, max_grad_norm=0.5, accountant="rdp", source=SecureRandom())
    optimizer = private.optimizer(net, torch.optim.SGD(net.parameters(), lr=1.0))
    optimizer.zero_grad()
    private.backward(F.cross_entropy(net(images), labels))
    optimizer.step()
    factors = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    for old, new, grads in zip(before, net.parameters(), per_sample):
        step = (grads * factors.view(-1, *[1] * (grads.dim() - 1))).sum(0) / 8
        torch.testing.assert_close(new.detach(), old - step, rtol=1e-9, atol=1e-12)
    assert private.accountant.history == [(0.0, 0.25, 1)]


def test_batch_norm_model_is_refused_with_the_fix_named():
    with pytest.raises(ValueError, match="resnet18_groupnorm"):
        check_dp_compatible(resnet18(norm="batch", inplace=True))


def test_a_round_asked_again_is_replayed_and_a_new_run_draws_fresh_noise(private_site, tmp_path):
    cfg = dp_config(tmp_path, "data.augment.prob=0", "privacy.noise_multiplier=1.0")
    initial = build_classifier(cfg, seed=0).net.state_dict()
    first, charged = train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, server_round=1, run_id="a")
    again, replayed = train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, server_round=1, run_id="a")
    other, fresh = train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, 1, run_id="b")  # same seed
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same bytes, uncharged
    assert replayed["epsilon"] == charged["epsilon"]
    assert any(not torch.equal(first[k], other[k]) for k in first)  # fresh noise, not the seed's
    assert fresh["epsilon"] > charged["epsilon"]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_ledger_refusal_and_restart(private_site, tmp_path, accountant):
    noise, rounds = 1.2, 2
    cfg = dp_config(
        tmp_path,
        "data.augment.prob=0",
        f"privacy.noise_multiplier={noise}",
        f"privacy.accountant={accountant}",
        "data.batch_size=16",
    )
    initial = build_classifier(cfg, seed=0).net.state_dict()
    n = int((SiteCache(private_site.cache(DEMO_IMAGE_SIZE)).manifest()["split"] == "train").sum())
    batches = -(-n // 16)
    delta = 1.0 / (10 * n)
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    expected = []
    for _ in range(rounds + 1):
        for _ in range(batches):
            independent.step(noise_multiplier=noise, sample_rate=1.0 / batches)
        expected.append(independent.get_epsilon(delta))
    budget = float(expected[rounds - 1] + expected[rounds]) / 2  # room for two rounds, not three
    cfg.privacy.epsilon_budget = budget

    for server_round in range(1, rounds + 1):
        _, metrics = train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, server_round, run_id="run-a")
        assert metrics["epsilon"] == pytest.approx(expected[server_round - 1], rel=1e-6)
        assert metrics["delta"] == pytest.approx(delta)
    with pytest.raises(PrivacyBudgetExhausted, match=f"round {rounds + 1} would bring it"):
        train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, rounds + 1, run_id="run-a")

    # A charged round asked again gets its release back, as released: never charged twice.
    _, metrics = train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, 1, run_id="run-a")
    assert metrics["epsilon"] == pytest.approx(expected[0], rel=1e-6)

    # A restarted site (a new process, a new run) reads the same spent budget and refuses.
    restarted = PrivacyLedger.for_cache(private_site.cache(DEMO_IMAGE_SIZE), accountant)
    assert len(restarted.entries) == rounds
    assert restarted.spent(delta) == pytest.approx(expected[rounds - 1], rel=1e-6)
    with pytest.raises(PrivacyBudgetExhausted):
        train_site(cfg, private_site.cache(DEMO_IMAGE_SIZE), initial, 1, run_id="run-b")
