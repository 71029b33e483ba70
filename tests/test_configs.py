"""Every model and trainer config composes and instantiates (a broken YAML fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from pipeline.training.loop import build_classifier, build_trainer
from tests.conftest import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("name", MODELS)
def test_model_config_instantiates(name):
    cfg = compose_config(f"model={name}")
    net = instantiate(cfg.model.net).eval()
    optimizer = instantiate(cfg.model.optimizer)(net.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert cfg.model.weights_path is None
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64)).shape == (1, 3)


def test_group_norm_config_is_the_dp_variant():
    net = build_classifier(compose_config("model=resnet18_groupnorm"), seed=0).net
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_config_builds(name, tmp_path):
    cfg = compose_config(f"trainer={name}")
    lean = build_trainer(cfg, max_epochs=2, lean=True)
    assert isinstance(lean, pl.Trainer) and lean.max_epochs == 2
    assert lean.logger is None and not lean.checkpoint_callbacks
    full = build_trainer(cfg, max_epochs=1, output_dir=tmp_path)
    assert {type(lg).__name__ for lg in full.loggers} == {"CSVLogger", "TensorBoardLogger"}
    assert full.checkpoint_callbacks
