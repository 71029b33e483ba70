"""Shared fixtures: demo hospitals built from the embedded sample and preprocessed once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.contracts.layout import SitePaths
from pipeline.governance.revocation import preprocess_sites
from pipeline.support.demo_sites import planted_identifiers as site_identifiers
from pipeline.support.demo_sites import prepare_demo_sites

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = REPO / "data" / "dicom"
DEMO_IMAGE_SIZE = 64
# A quick federation of the demo sites: small CNN, one local epoch.
FAST_FEDERATION = (
    "experiment=demo",
    "model=small_cnn",
    f"data.image_size={DEMO_IMAGE_SIZE}",
    "federation.local_epochs=1",
)


class DemoSites(NamedTuple):
    """The demo sites root and each site's paths (preprocessed, caches ready)."""

    root: Path
    sites: list[SitePaths]


def compose_config(*overrides: str):
    """The project configuration with Hydra overrides, outside any Hydra app."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


TORCH_THREADS = torch.get_num_threads()  # this process's default


@pytest.fixture(autouse=True)
def default_torch_threads():
    """Every test (and the module fixtures of the next) starts from torch's default thread count:
    a test or a site's training that pins it must not change what later tests compute (a
    float sum over another number of threads can change a trained model, and a test's verdict)."""
    yield
    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def demo_sites(tmp_path_factory) -> DemoSites:
    """Three demo sites (all embedded images) preprocessed at 64 px, shared by the session."""
    root = tmp_path_factory.mktemp("demo_sites")
    sites = prepare_demo_sites(root, n_sites=3)
    cfg = compose_config(
        f"data.sites_root={root}",
        f"data.image_size={DEMO_IMAGE_SIZE}",
        "data.sites=[site1,site2,site3]",
        "preprocess.workers=1",
    )
    preprocess_sites(cfg)
    return DemoSites(root=root, sites=sites)


@pytest.fixture
def private_site(demo_sites, tmp_path) -> SitePaths:
    """A copy of demo site 1 under ``tmp_path`` (so that its privacy ledger is the test's own)."""
    site = SitePaths.under(tmp_path, "site1")
    shutil.copytree(demo_sites.sites[0].cache(DEMO_IMAGE_SIZE), site.cache(DEMO_IMAGE_SIZE))
    return site


def dp_config(root: Path, *overrides: str):
    """The quick demo federation with DP-SGD over the sites under ``root``."""
    return compose_config(*FAST_FEDERATION, f"data.sites_root={root}", "privacy=dp_sgd", *overrides)


@pytest.fixture(scope="session")
def planted_identifiers(demo_sites) -> list[str]:
    """Every invented identifying DICOM value of every demo site, sorted."""
    return sorted(set().union(*(site_identifiers(site) for site in demo_sites.sites)))


def one_round_command(sites_root: Path, out: Path, *overrides: str) -> list[str]:
    """``scripts/simulate.py``: one quick federated round of the demo sites under ``sites_root``."""
    return [
        sys.executable,
        str(REPO / "scripts" / "simulate.py"),
        *FAST_FEDERATION,
        f"data.sites_root={sites_root}",
        "data.prepare_demo=false",
        "federation.num_rounds=1",
        *overrides,
        f"output_dir={out}",
    ]


# Markers whose tests run only when selected (pytest -m <marker>): long, or needing a service.
OPT_IN = {
    "chaos": "chaos tests run only with `pytest -m chaos` (about an hour on 2 cores)",
    "docker": "the docker test runs only with `pytest -m docker` (make docker-test)",
    "scale": "scale tests run only with `pytest -m scale` (minutes each)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with one line, the tests of an opt-in marker that the -m expression does not name."""
    selected = config.getoption("markexpr") or ""
    for item in items:
        for marker, why in OPT_IN.items():
            if item.get_closest_marker(marker) is not None and marker not in selected:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def demo_run(demo_sites, tmp_path_factory) -> Path:
    """One federated round of the demo through the real entry point."""
    out = tmp_path_factory.mktemp("demo_run")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    command = one_round_command(demo_sites.root, out)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out / "stdout.txt").write_text(done.stdout + done.stderr)
    return out


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's headless-capable ``chromium``; the test is skipped where it is absent."""
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found
