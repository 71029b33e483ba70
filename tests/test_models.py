"""Networks: output shapes, the DP-ready ResNet variant and loading local weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.densenet import densenet121
from models.resnet import resnet18
from models.small_cnn import SmallCNN
from models.weights import load_weights
from pipeline.training.checkpoints import save_checkpoint
from tests.conftest import compose_config

NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


@pytest.mark.parametrize("build", [resnet18, densenet121, SmallCNN], ids=lambda b: b.__name__)
def test_one_channel_in_three_logits_out(build):
    net = build().eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 64)).shape == (2, 3)


def norm_types(net: nn.Module) -> set[type]:
    return {type(m) for m in net.modules() if isinstance(m, NORMS)}


def test_norm_choice_reaches_every_layer():
    assert norm_types(resnet18(norm="batch")) == {nn.BatchNorm2d}
    assert norm_types(resnet18(norm="group")) == {nn.GroupNorm}


def test_group_norm_variant_trains_under_opacus():
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    net = resnet18(norm="group", inplace=False)
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    assert ModuleValidator.validate(net, strict=False) == []
    wrapped = GradSampleModule(net)
    wrapped(torch.rand(3, 1, 64, 64)).sum().backward()
    assert net.fc.weight.grad_sample.shape == (3, *net.fc.weight.shape)


def test_bad_norm_name_is_refused():
    with pytest.raises(ValueError, match="model.net.norm"):
        resnet18(norm="layer")


def test_local_weights_load_from_state_dict_and_model_checkpoint(tmp_path):
    source = SmallCNN()
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "model.pt", source, compose_config("model=small_cnn"))
    for name in ("plain.pt", "model.pt"):
        target = SmallCNN()
        assert load_weights(target, tmp_path / name) == []
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_mismatched_weights_name_the_keys(tmp_path):
    torch.save(SmallCNN(width=8).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"shape mismatch .*features\.0\.weight.*weights_strict"):
        load_weights(SmallCNN(width=16), tmp_path / "narrow.pt")


def test_non_strict_loading_skips_a_different_head(tmp_path):
    source = SmallCNN(num_classes=2)
    torch.save(source.state_dict(), tmp_path / "two_class.pt")
    target = SmallCNN(num_classes=3)
    skipped = load_weights(target, tmp_path / "two_class.pt", strict=False)
    assert skipped == ["classifier.weight", "classifier.bias"]
    assert torch.equal(target.features[0].weight, source.features[0].weight)


def test_rgb_weights_load_into_the_one_channel_network(tmp_path):
    """ImageNet-style weights: the first convolution's three input channels are summed, so the
    gray network answers a gray image as the RGB network answers it repeated on R, G and B."""
    source = SmallCNN(in_channels=3).eval()
    torch.save(source.state_dict(), tmp_path / "rgb.pt")
    target = SmallCNN().eval()
    assert load_weights(target, tmp_path / "rgb.pt") == []
    assert torch.equal(target.features[0].weight, source.features[0].weight.sum(dim=1, keepdim=True))
    gray = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(gray), source(gray.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights_path"):
        load_weights(SmallCNN(), tmp_path / "absent.pt")
