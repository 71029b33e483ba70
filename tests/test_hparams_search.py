"""Hyper-parameter search: Hydra's Optuna sweeper over whole federations of the demo sites."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.federation.objective import validation_metric
from tests.conftest import FAST_FEDERATION, REPO


@pytest.mark.slow
def test_optuna_sweep_maximises_the_validation_metric(demo_sites, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(REPO / "scripts" / "simulate.py"),
        "-m",
        "hparams_search=demo_optuna",
        *FAST_FEDERATION,
        "federation.num_rounds=1",
        "hydra.sweeper.n_trials=2",
        f"data.sites_root={demo_sites.root}",
        "data.prepare_demo=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    # federation.num_rounds is fixed on the command line, so it leaves the search space.
    assert set(results["best_params"]) == {
        "model.optimizer.lr",
        "data.augment.prob",
        "data.augment.rotate_degrees",
    }
    assert 1e-4 <= results["best_params"]["model.optimizer.lr"] <= 1e-2
    trials = [validation_metric(sweep_dir / f"trial_{n}", "val_pneumonia_auroc") for n in (0, 1)]
    assert results["best_value"] == pytest.approx(max(trials))
    assert all((sweep_dir / f"trial_{n}" / "model.pt").is_file() for n in (0, 1))
