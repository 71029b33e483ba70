"""A site: preprocess its own data if needed, then run Flower's SuperNode on its cache.

The SuperNode dials out to the coordinator (no inbound port at the hospital), proves its
identity with the site's private key, verifies the coordinator against the federation CA,
and runs fedrad's ClientApp on ``cache-dir`` for every message it receives.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

from pipeline.deployment import flower_cli
from pipeline.deployment.transport import supernode_security_args
from pipeline.preprocess import preprocess_site, site_from_config
from pipeline.sites import SitePaths

log = logging.getLogger("fedrad.deployment")


def configured_site(cfg: DictConfig) -> SitePaths:
    """The site described by ``+site=<name>`` (``conf/site/<name>.yaml``)."""
    if cfg.get("site") is None:
        raise ValueError(
            "no site selected: pass +site=<name> for conf/site/<name>.yaml "
            "(e.g. +site=demo_site1), which names this site's data folders"
        )
    return site_from_config(cfg.site)


def supernode_command(dep: DictConfig, cache_dir: Path, governance: DictConfig) -> list[str]:
    """``flower-supernode`` for one site's cache, with the site's own job-approval policy."""
    node_config = (
        f"cache-dir='{cache_dir.resolve()}' "
        f"require-approval={str(bool(governance.require_approval)).lower()} "
        f"auto-approve={str(bool(governance.auto_approve_simulated_sites)).lower()}"
    )
    command = [
        flower_cli.flower_tool("flower-supernode"),
        "--superlink", str(dep.superlink),
        *supernode_security_args(dep),
        "--node-config", node_config,
        "--port", str(dep.supernode_port),
    ]
    if dep.max_wait_s is not None:
        command += ["--max-wait-time", str(dep.max_wait_s)]
    return command


def run_site(cfg: DictConfig) -> NoReturn:
    """Preprocess (unchanged files are skipped), then become the site's SuperNode."""
    site = configured_site(cfg)
    command = supernode_command(cfg.deployment, site.cache_dir, cfg.governance)
    preprocess_site(site, cfg.preprocess)  # logs the site's summary
    log.info("site %s connecting to the coordinator at %s", site.name, cfg.deployment.superlink)
    if cfg.governance.auto_approve_simulated_sites:
        log.warning("site %s approves every undecided job automatically "
                    "(governance.auto_approve_simulated_sites): for demo sites only", site.name)
    os.execve(command[0], command, flower_cli.flower_env())
