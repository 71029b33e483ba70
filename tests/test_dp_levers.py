"""DP-SGD levers: augmentation multiplicity and weight-standardised convolutions, each checked
against per-sample gradients from plain autograd (torch.func) on real demo X-rays."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader

from models.registry import build_network
from models.resnet import resnet18
from models.small_cnn import SmallCNN
from models.weight_standardisation import WSConv2d
from pipeline.contracts.cache import SiteCache, SplitArrays
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.federation.site_task import train_site
from pipeline.privacy.clipping import PerSampleClipper, _through_standardisation
from pipeline.privacy.dp import DPSettings, PoissonDataModule, check_dp_compatible, epsilon_of, plan_round
from pipeline.privacy.randomness import SeededRandom
from pipeline.training.datamodule import ImageDataset
from pipeline.training.loop import build_classifier
from tests.conftest import DEMO_IMAGE_SIZE, compose_config, dp_config
from transforms.image import build_augmentation, resize_square

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "kermany"
# The last commit whose clipper had no augmentation multiplicity nor weight standardisation.
BEFORE_LEVERS = "579446c"
SIZE = 32  # the early convolutions take the materialised path, the late ones the ghost norm
NETS = {
    "small_cnn": lambda: SmallCNN(width=8),
    "resnet18_groupnorm": lambda: resnet18(norm="group", groups=8, inplace=False),
}


def demo_xrays(per_class: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` demo X-rays of each class, (N, 1, size, size) in [0, 1], and labels."""
    images, labels = [], []
    for index, name in enumerate(CLASS_NAMES):
        for png in sorted(DEMO.glob(f"{name}_*.png"))[:per_class]:
            pixels = np.asarray(Image.open(png).convert("L"), np.float32) / 255.0
            images.append(resize_square(pixels, size)[None])
            labels.append(index)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def augmented_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """``views`` independently augmented copies of every image, each image's copies consecutive."""
    augment = build_augmentation(rotate_degrees=10, translate_fraction=0.05, scale_fraction=0.1, prob=1.0)
    augment.set_random_state(0)
    return torch.stack([augment(image) for image in images for _ in range(views)])


def per_view_grads(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Reference per-sample gradients of every parameter with respect to the raw weights:
    ``vmap(grad)`` of each row's own loss."""
    params = {name: p.detach() for name, p in net.named_parameters()}

    def loss(params, image, label):
        return F.cross_entropy(functional_call(net, params, (image[None],)), label[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    return [grads[name] for name, _ in net.named_parameters()]


def views_and_reference(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, views: int):
    """``views`` augmented rows of each image, the clipping bound (the median per-example norm)
    and the reference: per-example gradients as the mean of their views' autograd gradients,
    their norms and clipped sums."""
    rows, row_labels = augmented_views(images, views).double(), labels.repeat_interleave(views)
    per_view = per_view_grads(net, rows, row_labels)
    per_example = [g.view(len(labels), views, *g.shape[1:]).mean(1) for g in per_view]
    norms = torch.cat([g.flatten(1) for g in per_example], 1).norm(dim=1)
    clip = float(norms.median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    sums = [(g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) for g in per_example]
    return rows, row_labels, clip, norms, sums


@pytest.mark.parametrize("name", NETS)
def test_augmentation_multiplicity_clips_each_examples_mean_view_gradient(name):
    """K=3 augmented views of 3 real X-rays: the clipper's norms and clipped sum are those of
    the mean of each example's 3 per-view gradients, clipped once."""
    views = 3
    torch.manual_seed(0)
    net = NETS[name]().double()
    images, labels = demo_xrays(per_class=1)
    rows, row_labels, clip, expected_norms, expected_sums = views_and_reference(net, images, labels, views)

    clipper = PerSampleClipper(net, clip, views=views)
    measured = clipper.backward(F.cross_entropy(net(rows), row_labels))

    assert measured.shape == (len(labels),)
    torch.testing.assert_close(measured, expected_norms, rtol=1e-7, atol=0)
    assert bool((expected_norms > clip).any()), "some examples should need clipping"
    for param, expected in zip(net.parameters(), expected_sums):
        torch.testing.assert_close(param.grad, expected, rtol=1e-7, atol=1e-10)


def _clipper_before_levers(tmp_path: Path):
    """``PerSampleClipper`` as committed before the levers (skips where git history is absent)."""
    shown = subprocess.run(
        ["git", "show", f"{BEFORE_LEVERS}:pipeline/privacy/clipping.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if shown.returncode:
        pytest.skip(f"git history with commit {BEFORE_LEVERS} is not available")
    (tmp_path / "clipping_before.py").write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("clipping_before", tmp_path / "clipping_before.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PerSampleClipper


def test_multiplicity_one_leaves_the_step_bit_identical(tmp_path):
    """K=1 (the default): norms and clipped sums equal, bit for bit, those of the clipper before
    the levers, on both the materialised and the ghost-norm paths; batches are not repeated."""
    before = _clipper_before_levers(tmp_path)
    torch.manual_seed(0)
    net = NETS["resnet18_groupnorm"]()
    images, labels = demo_xrays(per_class=2)
    results = []
    for make in (before, PerSampleClipper):
        net.zero_grad(set_to_none=True)
        clipper = make(net, 0.5)
        norms = clipper.backward(F.cross_entropy(net(images), labels))
        results.append((norms, [p.grad.clone() for p in net.parameters()]))
        clipper.remove()
    (old_norms, old_grads), (norms, grads) = results
    assert torch.equal(norms, old_norms)
    assert all(torch.equal(new, old) for new, old in zip(grads, old_grads))


def test_multiplicity_of_identical_views_equals_one_view():
    """Without augmentation the K views are one image: the step is that of K=1 (float32)."""
    torch.manual_seed(0)
    net = NETS["resnet18_groupnorm"]()
    images, labels = demo_xrays(per_class=2)
    single = PerSampleClipper(net, 1.0)
    single_norms = single.backward(F.cross_entropy(net(images), labels))
    single_grads = [p.grad.clone() for p in net.parameters()]
    single.remove()
    net.zero_grad(set_to_none=True)
    repeated = PerSampleClipper(net, 1.0, views=4)
    rows = images.repeat_interleave(4, dim=0)
    norms = repeated.backward(F.cross_entropy(net(rows), labels.repeat_interleave(4)))
    torch.testing.assert_close(norms, single_norms, rtol=1e-5, atol=0)
    for param, expected in zip(net.parameters(), single_grads):
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)


class _TrainSplit(pl.LightningDataModule):
    def __init__(self, dataset: ImageDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=4, shuffle=True)


def test_poisson_batches_hold_each_sampled_example_k_times_freshly_augmented():
    images, labels = demo_xrays(per_class=4)
    augment = build_augmentation(rotate_degrees=10, translate_fraction=0.05, scale_fraction=0.1, prob=1.0)
    augment.set_random_state(0)
    split = SplitArrays(images.numpy(), labels.numpy(), [str(i) for i in range(len(labels))])
    dataset = ImageDataset(split, augment)
    plain = PoissonDataModule(_TrainSplit(dataset), SeededRandom(0)).train_dataloader()
    loader = PoissonDataModule(
        _TrainSplit(dataset), SeededRandom(0), augmentation_multiplicity=3
    ).train_dataloader()
    assert len(loader) == len(plain) == 3  # the examples' sampling is unchanged
    assert type(plain.batch_sampler).__name__ == "SecurePoissonSampler"  # K=1: not wrapped
    for (plain_images, plain_labels), (rows, row_labels) in zip(plain, loader):
        assert rows.shape[0] == 3 * plain_images.shape[0]  # the same coins: the same examples
        assert torch.equal(row_labels, plain_labels.repeat_interleave(3))
        views = rows.view(-1, 3, *rows.shape[1:])
        assert all(not torch.equal(v[0], v[1]) and not torch.equal(v[1], v[2]) for v in views)


def test_weight_standardisation_jacobian_closed_form_matches_autograd():
    """Per output channel, the raw weight's gradient is (g - mean g - w_hat mean(g w_hat)) / sigma."""
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, padding=1).double()
    upstream = torch.randn(5, 16, 8 * 9, dtype=torch.float64)  # 5 per-sample gradients w.r.t. w_hat
    expected = torch.stack(
        [
            torch.autograd.grad(conv.standardised_weight(), conv.weight, g.view_as(conv.weight))[0]
            for g in upstream
        ]
    )
    torch.testing.assert_close(
        _through_standardisation(upstream, conv), expected.flatten(2), rtol=1e-10, atol=1e-12
    )
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    w_hat = conv.standardised_weight()
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, padding=1))
    assert torch.allclose(w_hat.flatten(1).mean(1), torch.zeros(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        w_hat.flatten(1).std(1, unbiased=False), torch.ones(16, dtype=torch.float64), atol=1e-3
    )


@pytest.mark.parametrize("views", [1, 2])
def test_weight_standardised_resnet_per_sample_clipping_matches_autograd(views):
    """Every convolution of the group-norm ResNet-18 weight-standardised, 3 real X-rays at
    16 px (the stem on the materialised path, the 19 others on the ghost norm), with and
    without multiplicity."""
    torch.manual_seed(0)
    net = resnet18(norm="group", groups=8, inplace=False, weight_standardisation=True).double()
    assert sum(isinstance(m, WSConv2d) for m in net.modules()) == 20  # 17 3x3/7x7 + 3 projections
    check_dp_compatible(net)
    images, labels = demo_xrays(per_class=1, size=16)
    rows, row_labels, clip, expected_norms, expected_sums = views_and_reference(net, images, labels, views)
    measured = PerSampleClipper(net, clip, views=views).backward(F.cross_entropy(net(rows), row_labels))
    torch.testing.assert_close(measured, expected_norms, rtol=1e-7, atol=0)
    for param, expected in zip(net.parameters(), expected_sums):
        torch.testing.assert_close(param.grad, expected, rtol=1e-7, atol=1e-10)


class _ScaledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (nn.Sequential(WSConv2d(4, 4, 3, groups=2), nn.Flatten()), r"0 \(Conv2d with groups"),
        (nn.Sequential(_ScaledConv(1, 4, 3), nn.Flatten()), r"0 \(_ScaledConv\)"),
        (
            nn.Sequential(WSConv2d(1, 4, 3, padding=1, padding_mode="reflect")),
            r"0 \(Conv2d with .*padding_mode",
        ),
    ],
    ids=["grouped_ws_conv", "conv_subclass", "reflect_padded_ws_conv"],
)
def test_layers_the_clipper_cannot_follow_are_refused_in_one_line(net, message):
    with pytest.raises(ValueError, match=message) as refused:
        PerSampleClipper(net, 1.0)
    assert "\n" not in str(refused.value)


def test_a_batch_that_is_not_whole_views_is_refused_in_one_line():
    net = SmallCNN(width=8)
    clipper = PerSampleClipper(net, 1.0, views=4)
    with pytest.raises(ValueError, match="6 rows is not 4 views") as refused:
        clipper.backward(F.cross_entropy(net(torch.rand(6, 1, 16, 16)), torch.zeros(6, dtype=torch.long)))
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="privacy.augmentation_multiplicity must be at least 1"):
        PerSampleClipper(net, 1.0, views=0)


def test_config_turns_each_lever_on():
    cfg = compose_config("privacy=dp_sgd", "model=resnet18_gn_ws", "privacy.augmentation_multiplicity=4")
    assert DPSettings.from_config(cfg.privacy).augmentation_multiplicity == 4
    assert DPSettings.from_config(compose_config("privacy=dp_sgd").privacy).augmentation_multiplicity == 1
    net = build_network(cfg.model.net)
    assert all(isinstance(m, WSConv2d) for m in net.modules() if isinstance(m, nn.Conv2d))
    check_dp_compatible(net)
    plain = build_network(compose_config("model=resnet18_groupnorm").model.net)
    assert not any(isinstance(m, WSConv2d) for m in plain.modules())


def test_a_site_round_with_multiplicity_spends_the_epsilon_of_its_examples(private_site, tmp_path):
    """A DP-SGD round at a demo site with K=2 views trains (Lightning, the Poisson loader, the
    clipper) and is charged exactly the epsilon of its examples' sampling."""
    site = private_site
    cfg = dp_config(tmp_path, "privacy.noise_multiplier=1.0", "privacy.augmentation_multiplicity=2")
    n = int((SiteCache(site.cache(DEMO_IMAGE_SIZE)).manifest()["split"] == "train").sum())
    plan = plan_round(DPSettings.from_config(cfg.privacy), n, int(cfg.data.batch_size), 1, 1)
    initial = build_classifier(cfg, seed=0).net.state_dict()
    state, metrics = train_site(cfg, site.cache(DEMO_IMAGE_SIZE), initial, server_round=1, run_id="levers")
    assert metrics["epsilon"] == pytest.approx(epsilon_of(plan.history, plan.delta, "rdp"), rel=1e-9)
    assert any(not torch.equal(state[k], initial[k]) for k in initial)
