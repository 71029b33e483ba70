"""Training, evaluation and checkpoints on the preprocessed demo sites (real images)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.contracts.cache import SiteCache
from pipeline.contracts.labels import CLASS_NAMES
from pipeline.training.checkpoints import load_checkpoint, load_model, save_checkpoint
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import build_classifier, build_trainer, evaluate, predict_probabilities, train
from pipeline.training.progress import TrainingProgress
from tests.conftest import DEMO_IMAGE_SIZE, compose_config

REPO = Path(__file__).resolve().parents[1]
SCORES = ("acc", "auroc", "mcc", "pneumonia_auroc", "loss")


@pytest.fixture(scope="module")
def cfg(demo_sites):
    return compose_config(
        "model=small_cnn", f"data.image_size={DEMO_IMAGE_SIZE}", f"data.sites_root={demo_sites.root}"
    )


@pytest.fixture(scope="module")
def cache_dirs(demo_sites) -> list[Path]:
    return [site.cache(DEMO_IMAGE_SIZE) for site in demo_sites.sites]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_loss(classifier, datamodule: CacheDataModule) -> float:
    data = datamodule.dataset("train")
    probabilities = torch.from_numpy(predict_probabilities(classifier, data.images))
    return float(F.nll_loss(probabilities.clamp_min(1e-7).log(), data.labels))


def test_training_lowers_the_loss_and_reports_metrics(cfg, cache_dirs):
    classifier = build_classifier(cfg, seed=0)
    datamodule = CacheDataModule.from_config(cfg.data, cache_dirs, seed=0)
    before = train_loss(classifier, datamodule)
    metrics = train(classifier, datamodule, build_trainer(cfg, max_epochs=4, lean=True))
    assert train_loss(classifier, datamodule) < before
    assert set(metrics) == {"train/loss", "num-examples"}
    assert metrics["num-examples"] == datamodule.num_train_examples > 0

    scores = evaluate(classifier, datamodule, "val", build_trainer(cfg, max_epochs=1, lean=True))
    per_class = {f"val/{kind}_{name}" for kind in ("sensitivity", "support") for name in CLASS_NAMES}
    assert set(scores) == {f"val/{k}" for k in SCORES} | per_class | {"num-examples"}
    assert sum(scores[f"val/support_{name}"] for name in CLASS_NAMES) == scores["num-examples"]
    assert scores["num-examples"] == len(datamodule.dataset("val"))


def test_train_shuffle_is_fixed_by_the_seed(cfg, cache_dirs):
    def first_labels(seed: int) -> list[int]:
        datamodule = CacheDataModule(cache_dirs, batch_size=16, seed=seed)
        datamodule.setup("fit")
        return next(iter(datamodule.train_dataloader()))[1].tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)


def test_only_the_train_split_is_augmented(cfg, cache_dirs):
    augment = {**cfg.data.augment, "prob": 1.0}
    datamodule = CacheDataModule(cache_dirs, augment=augment, seed=0)
    train_set, val_set = datamodule.dataset("train"), datamodule.dataset("val")
    assert not torch.equal(train_set[0][0], train_set.images[0])
    assert train_set[0][0].shape == train_set.images[0].shape
    assert torch.equal(val_set[0][0], val_set.images[0])


def test_image_size_mismatch_is_explained(cfg, cache_dirs):
    with pytest.raises(ValueError, match="data.image_size=128"):
        CacheDataModule(cache_dirs, image_size=128).dataset("train")


def test_checkpoint_round_trip(cfg, tmp_path):
    net = build_classifier(cfg, seed=3).net.eval()
    path = save_checkpoint(tmp_path / "model.pt", net, cfg, extra={"round": 2})
    state, info = load_checkpoint(path)
    assert info["round"] == 2 and info["class_names"] == ["normal", "bacterial", "viral"]
    assert info["image_size"] == DEMO_IMAGE_SIZE
    assert state.keys() == net.state_dict().keys()
    loaded, _ = load_model(path)
    images = torch.rand(4, 1, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    np.testing.assert_allclose(predict_probabilities(loaded, images), predict_probabilities(net, images))


def test_evaluate_script_writes_metrics_and_plots(cfg, cache_dirs, tmp_path):
    save_checkpoint(tmp_path / "model.pt", build_classifier(cfg, seed=0).net, cfg)
    out = tmp_path / "report"
    run_script(
        "scripts/evaluate.py", str(tmp_path / "model.pt"), *map(str, cache_dirs), "--output-dir", str(out)
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "auroc", "mcc", "pneumonia_auroc", "n_images", "n_patients"):
        assert key in metrics
    assert set(metrics["per_class"]) == {"normal", "bacterial", "viral"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_images"] > 0
    assert metrics["n_patients"] <= metrics["n_images"]
    assert (out / "confusion_matrix.png").stat().st_size > 0 and (out / "roc.png").stat().st_size > 0


@pytest.mark.slow
def test_local_baseline_end_to_end(demo_sites, tmp_path):
    run_script(
        "scripts/train.py",
        "mode=local",
        "local_site=site1",
        "model=small_cnn",
        f"data.image_size={DEMO_IMAGE_SIZE}",
        f"data.sites_root={demo_sites.root}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"output_dir={tmp_path}",
    )
    _, info = load_checkpoint(tmp_path / "model.pt")
    assert info["sites"] == ["site1"] and info["epochs"] == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # scored on every site's test patients, like the federated model
    all_tests = sum(len(SiteCache(s.cache(DEMO_IMAGE_SIZE)).load_split("test").labels) for s in demo_sites.sites)
    assert metrics["n_images"] == all_tests > 0
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "logs" / "csv" / "metrics.csv").is_file()



PROGRESS_SCRIPT = """
from pipeline.training.datamodule import CacheDataModule
from pipeline.training.loop import build_classifier, build_trainer, train
from pipeline.training.progress import TrainingProgress
from tests.conftest import compose_config
cfg = compose_config("model=small_cnn", "data.image_size={size}", "data.sites_root={root}")
datamodule = CacheDataModule.from_config(cfg.data, [{cache!r}], seed=0)
trainer = build_trainer(cfg, max_epochs=1, lean=True, callbacks=[TrainingProgress("site1 round 1", 0.0)])
train(build_classifier(cfg, seed=0), datamodule, trainer)
"""


def test_a_long_local_training_shows_its_progress_where_no_logging_is_set_up(demo_sites, cache_dirs):
    """As in a simulated site's worker process: progress lines every every_s seconds and one at
    the end, in fedrad's console format."""
    script = PROGRESS_SCRIPT.format(size=DEMO_IMAGE_SIZE, root=demo_sites.root, cache=str(cache_dirs[0]))
    output = run_script("-c", script).stderr
    lines = [line for line in output.splitlines() if "site1 round 1" in line]
    losses = [re.search(r"epoch 1/1  batch \d+/\d+  loss (\S+)", line) for line in lines]
    assert any(losses), output[-2000:]
    assert all(math.isfinite(float(m.group(1))) for m in losses if m), lines  # the batch's own loss
    assert lines[-1].split(" ", 1)[1].startswith("site1 round 1  trained 1 epoch(s)"), lines


def test_a_short_local_training_prints_no_progress(caplog):
    class Trainer:
        current_epoch, global_step, max_epochs, num_training_batches = 1, 3, 1, 3
        callback_metrics: dict = {}

    progress = TrainingProgress("site1 round 1", every_s=3600)
    with caplog.at_level(logging.INFO, logger="fedrad.training"):
        progress.on_train_start(Trainer(), None)
        progress.on_train_batch_end(Trainer(), None, None, None, 0)
        progress.on_train_end(Trainer(), None)
    assert not caplog.records
