"""Crash-safe resume of a federation on the same output folder (real ServerApp and ClientApp
logic over an in-process grid; the SIGKILL scenario on real processes is in test_deployment)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.federation.server_app import run_federation
from pipeline.support.flower_grid import LoopbackGrid
from pipeline.training.checkpoints import load_checkpoint
from tests.conftest import FAST_FEDERATION, compose_config


def config(demo_sites, rounds: int, *extra: str):
    """A fast federation that releases its last round (no selection), so resuming shows in model.pt."""
    return compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={demo_sites.root}",
        "data.sites=[site1,site2,site3]",
        f"federation.num_rounds={rounds}",
        "federation.min_sites=3",
        "federation.selection.metric=null",
        *extra,
    )


def rounds_of(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "model.pt")[0]


@pytest.fixture(scope="module")
def two_rounds(demo_sites, tmp_path_factory) -> Path:
    """An uninterrupted two-round federation."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_federation(LoopbackGrid(partitions=3), config(demo_sites, 2), out)
    return out


def test_restart_continues_to_the_same_model(demo_sites, two_rounds, tmp_path):
    """A run stopped after round 1 and restarted ends with the uninterrupted run's model."""
    out = tmp_path / "run"
    run_federation(LoopbackGrid(partitions=3), config(demo_sites, 1), out)
    round_1 = (out / "checkpoints" / "round_001.pt").read_bytes()
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    grid = LoopbackGrid(partitions=3)
    run_federation(grid, config(demo_sites, 2), out)
    assert rounds_of(out) == [1, 2]
    assert (out / "checkpoints" / "round_001.pt").read_bytes() == round_1
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    assert len([t for t, _, _ in grid.replies if t == "train"]) == 3  # round 2 only
    expected, resumed = final_state(two_rounds), final_state(out)
    assert all(torch.allclose(expected[k].float(), resumed[k].float(), atol=1e-6) for k in expected)


def test_round_cut_short_is_run_again(demo_sites, two_rounds, tmp_path):
    """A checkpoint without its round record (killed during evaluation) and a half-written
    record line do not count: the run goes on from the last round that has both."""
    out = tmp_path / "run"
    shutil.copytree(two_rounds, out)
    lines = (out / "rounds.jsonl").read_text().splitlines()
    (out / "rounds.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    grid = LoopbackGrid(partitions=3)
    run_federation(grid, config(demo_sites, 2), out)
    assert rounds_of(out) == [1, 2]
    assert len([t for t, _, _ in grid.replies if t == "train"]) == 3


def test_finished_run_is_not_trained_again(demo_sites, two_rounds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_rounds, out)
    grid = LoopbackGrid(partitions=3)
    run_federation(grid, config(demo_sites, 2), out)
    assert grid.replies == [] and rounds_of(out) == [1, 2]


def test_other_experiment_in_the_folder_is_refused(demo_sites, two_rounds, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_rounds, out)
    with pytest.raises(ValueError, match="different experiment"):
        run_federation(LoopbackGrid(partitions=3), config(demo_sites, 3, "model.optimizer.lr=0.5"), out)


def test_secure_aggregation_run_resumes(demo_sites, tmp_path):
    out = tmp_path / "run"
    secure = ("federation.secure_aggregation=true",)
    run_federation(LoopbackGrid(partitions=3), config(demo_sites, 1, *secure), out)
    grid = LoopbackGrid(partitions=3)
    run_federation(grid, config(demo_sites, 2, *secure), out)
    assert rounds_of(out) == [1, 2]
    last = json.loads((out / "rounds.jsonl").read_text().splitlines()[-1])
    assert last["sites_trained"] == 3
    assert load_checkpoint(out / "model.pt")[1]["round"] == 2
