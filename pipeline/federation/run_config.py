"""How the experiment configuration travels from the coordinator to the sites.

The coordinator sends the experiment part of its Hydra config (model, trainer, data
hyper-parameters, federation, privacy and seed) with every message as YAML text. A site adds only
what is its own: where its cache lives (``cache-dir`` in the SuperNode's node config) or,
in simulation, which of ``data.sites`` it plays (``partition-id``).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.sites import SitePaths

CONFIG_KEY = "fedrad-config"
# The federation's own run id: stable across coordinator restarts, unlike Flower's.
RUN_ID_KEY = "fedrad-run-id"
# ``governance`` is the simulation operator's approval policy; a deployed site ignores it.
SHARED_SECTIONS = ("seed", "model", "trainer", "data", "federation", "privacy", "governance")


def experiment_yaml(cfg: DictConfig) -> str:
    """The resolved, site-independent part of the config, as one line of YAML (JSON)."""
    keys = [key for key in SHARED_SECTIONS if key in cfg]
    shared = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    return json.dumps(shared, separators=(",", ":"))


def experiment_from_yaml(text: str) -> DictConfig:
    """Parse the YAML text written by :func:`experiment_yaml`."""
    cfg = OmegaConf.create(text)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{CONFIG_KEY} must be a YAML mapping")
    return cfg


def site_cache_dir(node_config: dict, cfg: DictConfig) -> Path:
    """The cache folder of the site running this ClientApp.

    A deployed SuperNode names it (``--node-config "cache-dir='...'"``); a simulated one
    maps its ``partition-id`` to ``cfg.data.sites``.
    """
    if "cache-dir" in node_config:
        return Path(str(node_config["cache-dir"]))
    if "partition-id" not in node_config:
        raise KeyError(
            "this SuperNode has no 'cache-dir' in its node config: start it with "
            "--node-config \"cache-dir='/path/to/site/fedrad/cache'\""
        )
    index = int(node_config["partition-id"])
    names = list(cfg.data.sites)
    if index >= len(names):
        raise IndexError(f"partition-id {index} but data.sites lists only {names}")
    return SitePaths.under(cfg.data.sites_root, names[index]).cache_dir
