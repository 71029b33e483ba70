"""How the experiment configuration travels from the coordinator to the sites.

The coordinator sends the experiment part of its Hydra config (model, trainer, data
hyper-parameters, federation, privacy and seed) with every message as YAML text. A site adds only
what is its own: where its cache lives (``cache-dir`` in the SuperNode's node config) or,
in simulation, which of ``data.sites`` it plays (``partition-id``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from pipeline.federation.experiment_schema import InvalidExperiment, check_experiment
from pipeline.sites import SitePaths

CONFIG_KEY = "fedrad-config"
# The federation's own run id: stable across coordinator restarts, unlike Flower's.
RUN_ID_KEY = "fedrad-run-id"
# ``governance`` is the simulation operator's approval policy; a deployed site ignores it.
SHARED_SECTIONS = ("seed", "model", "trainer", "data", "federation", "privacy", "governance")


def experiment_yaml(cfg: DictConfig) -> str:
    """The resolved, site-independent part of the config, as one line of YAML (JSON).

    Raises :class:`pipeline.federation.experiment_schema.InvalidExperiment` for a config no site
    would accept (a component outside the allow-list), so that the coordinator fails first."""
    keys = [key for key in SHARED_SECTIONS if key in cfg]
    shared = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))
    check_experiment(shared)
    return json.dumps(shared, separators=(",", ":"))


def experiment_from_yaml(text: str) -> DictConfig:
    """The experiment in the JSON text written by :func:`experiment_yaml`, checked by
    :func:`pipeline.federation.experiment_schema.check_experiment` before anything is built."""
    try:
        experiment = json.loads(text)
    except (TypeError, ValueError) as error:
        raise InvalidExperiment(f"{CONFIG_KEY} is not the JSON of an experiment ({error})") from None
    check_experiment(experiment)
    return OmegaConf.create(experiment)


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
