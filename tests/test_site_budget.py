"""A site's standing privacy budget (its site file's ``epsilon_budget``) caps every job.

The real ServerApp runs against the real ClientApp on copies of the demo sites
(:class:`pipeline.support.flower_grid.LoopbackGrid`); site1 is a deployed site with its own node
config (:class:`pipeline.contracts.messages.NodeConfig`, what ``scripts/site.py`` writes from the
site file), the two others are simulated. A first job spends one DP round at every site. A second
job, approved with a budget of 1000, then runs with site1's standing cap between its epsilon
after two and after three rounds: site1 trains the second job's round 1 and refuses its round 2,
in plain FedAvg and under SecAgg+ alike. The cap and the ledger live on disk: every job is a new
run, as after a restart, and both hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.contracts.layout import SitePaths
from pipeline.contracts.messages import NodeConfig
from pipeline.federation.server_app import run_federation
from pipeline.governance.budget import PrivacyLedger
from pipeline.privacy.dp import epsilon_of
from pipeline.support.flower_grid import LoopbackGrid
from tests.conftest import DEMO_IMAGE_SIZE, FAST_FEDERATION, compose_config

pytestmark = [pytest.mark.slow, pytest.mark.governance]


def job(sites_root: Path, rounds: int, secure: bool):
    return compose_config(
        *FAST_FEDERATION,
        f"data.sites_root={sites_root}",
        "data.sites=[site1,site2,site3]",
        f"federation.num_rounds={rounds}",
        "federation.fraction_evaluate=0.0",
        "federation.min_sites=2",
        f"federation.secure_aggregation={str(secure).lower()}",
        "privacy=dp_sgd",
        "privacy.noise_multiplier=1.0",
        "privacy.epsilon_budget=1000",
    )


def grid_with_deployed_site1(site1: SitePaths, cap: float | None) -> LoopbackGrid:
    grid = LoopbackGrid(partitions=3)
    first = min(grid.contexts)
    node = NodeConfig(work_dir=site1.work_dir, site_name="site1", auto_approve=True, epsilon_budget=cap)
    grid.contexts[first].node_config |= node.as_node_config()  # keeps the grid's partition-id
    return grid


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_standing_budget_refuses_the_round_that_would_pass_it(demo_sites, tmp_path, secure):
    sites_root = tmp_path / "sites"
    shutil.copytree(demo_sites.root, sites_root)
    site1 = SitePaths.under(sites_root, "site1")
    torch.set_num_threads(1)

    run_federation(grid_with_deployed_site1(site1, None), job(sites_root, 1, secure), tmp_path / "job_a")
    ledger = PrivacyLedger.for_cache(site1.cache(DEMO_IMAGE_SIZE), "rdp")
    assert len(ledger.entries) == 1
    history, delta = ledger.history(), ledger.entries[0]["delta"]
    after_two, after_three = (epsilon_of(history * k, delta, "rdp") for k in (2, 3))
    cap = (after_two + after_three) / 2

    out = tmp_path / "job_b"
    run_federation(grid_with_deployed_site1(site1, cap), job(sites_root, 2, secure), out)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [sorted(r["train_per_site"]) for r in rounds] == [["site1", "site2", "site3"], ["site2", "site3"]]
    ledger = PrivacyLedger.for_cache(site1.cache(DEMO_IMAGE_SIZE), "rdp")
    assert len(ledger.entries) == 2 and ledger.spent(delta) == pytest.approx(after_two)
    assert ledger.spent(delta) <= cap
    others = PrivacyLedger.for_cache(SitePaths.under(sites_root, "site2").cache(DEMO_IMAGE_SIZE), "rdp")
    assert len(others.entries) == 3  # the job's own budget (1000) let the simulated sites go on
