"""Shared fixtures: demo hospitals built from the embedded sample and preprocessed once."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
from hydra import compose, initialize_config_dir

from pipeline.demo_sites import planted_identifiers as site_identifiers
from pipeline.demo_sites import prepare_demo_sites
from pipeline.preprocess import preprocess_sites
from pipeline.sites import SitePaths

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = REPO / "data" / "dicom"
DEMO_IMAGE_SIZE = 64


class DemoSites(NamedTuple):
    """The demo sites root and each site's paths (preprocessed, caches ready)."""

    root: Path
    sites: list[SitePaths]


def compose_config(*overrides: str):
    """The project configuration with Hydra overrides, outside any Hydra app."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def demo_sites(tmp_path_factory) -> DemoSites:
    """Three demo sites (all embedded images) preprocessed at 64 px, shared by the session."""
    root = tmp_path_factory.mktemp("demo_sites")
    sites = prepare_demo_sites(root, n_sites=3)
    cfg = compose_config(
        f"data.sites_root={root}", f"data.image_size={DEMO_IMAGE_SIZE}",
        "data.sites=[site1,site2,site3]", "preprocess.workers=1",
    )
    preprocess_sites(cfg)
    return DemoSites(root=root, sites=sites)


@pytest.fixture(scope="session")
def planted_identifiers(demo_sites) -> list[str]:
    """Every invented identifying DICOM value of every demo site, sorted."""
    return sorted(set().union(*(site_identifiers(site) for site in demo_sites.sites)))
