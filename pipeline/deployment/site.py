"""A site: preprocess its own data if needed, then run Flower's SuperNode on its cache.

The SuperNode dials out to the coordinator (no inbound port at the hospital), proves its
identity with the site's private key, verifies the coordinator against the federation CA,
and runs fedrad's ClientApp on its work folder (:class:`pipeline.contracts.messages.NodeConfig`)
for every message it receives.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import NoReturn

from omegaconf import DictConfig

from pipeline.contracts.layout import SitePaths
from pipeline.contracts.messages import NodeConfig
from pipeline.deployment import flower_cli
from pipeline.deployment.transport import supernode_security_args
from pipeline.governance.revocation import preprocess_consented

log = logging.getLogger("fedrad.deployment")


def configured_site(cfg: DictConfig) -> SitePaths:
    """The site described by ``+site=<name>`` (``conf/site/<name>.yaml``)."""
    if cfg.get("site") is None:
        raise ValueError(
            "no site selected: pass +site=<name> for conf/site/<name>.yaml "
            "(e.g. +site=demo_site1), which names this site's data folders"
        )
    return SitePaths.of_site_file(cfg.site)


def node_config(site: SitePaths, cfg: DictConfig) -> NodeConfig:
    """The site's own settings for its SuperNode: its work folder, its approval policy
    (``governance``) and, when its site file sets ``epsilon_budget``, its own privacy cap."""
    governance = cfg.governance
    budget = (cfg.get("site") or {}).get("epsilon_budget")
    return NodeConfig(
        work_dir=site.work_dir,
        require_approval=bool(governance.require_approval),
        auto_approve=bool(governance.auto_approve_simulated_sites),
        allow_seeded_noise=bool(governance.get("allow_seeded_noise", False)),
        retrain_round=str(governance.get("retrain_round", "refuse")),
        epsilon_budget=None if budget is None else float(budget),
    )


def supernode_command(dep: DictConfig, node: NodeConfig) -> list[str]:
    """``flower-supernode`` for one site, with the site's own settings (:class:`NodeConfig`)."""
    command = [
        flower_cli.flower_tool("flower-supernode"),
        "--superlink",
        str(dep.superlink),
        *supernode_security_args(dep),
        "--node-config",
        node.flag(),
        "--port",
        str(dep.supernode_port),
    ]
    if dep.max_wait_s is not None:
        command += ["--max-wait-time", str(dep.max_wait_s)]
    return command


# What flower-supernode prints (it exits with status 1) when the SuperLink cannot be reached or
# refuses to activate the node, e.g. a restarted site whose previous session still looks alive.
CONNECTION_ERROR = "Exit Code: 305"


def _supernode_refused(command: list[str]) -> tuple[int, bool]:
    """Run the SuperNode, echoing its output; (exit status, whether its connection was refused).

    The SuperNode is reaped as soon as it exits (its SuperExec helper, which shares the output
    pipe, only stops once its parent is gone). SIGTERM is passed on to the SuperNode.
    """
    process = subprocess.Popen(
        command,
        env=flower_cli.flower_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    output = process.stdout
    assert output is not None  # stdout=subprocess.PIPE
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    refused = threading.Event()

    def echo() -> None:
        for line in output:
            sys.stdout.write(line)
            sys.stdout.flush()
            if CONNECTION_ERROR in line:
                refused.set()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    code = process.wait()
    signal.signal(signal.SIGTERM, previous)
    reader.join(timeout=10)
    return code, refused.is_set()


def run_supernode(command: list[str], site: str, rejoin_delay_s: float) -> int:
    """Run the SuperNode until it exits; if its connection is refused, try once more after
    ``rejoin_delay_s``.

    Flower refuses to activate a key whose earlier session has not yet missed two heartbeats
    (30 s apart). Waiting the same delay as after a crash (:func:`_wait_out_crashed_session`)
    lets the coordinator see that session offline before this one takes its place.
    """
    code, refused = _supernode_refused(command)
    if refused:
        log.warning(
            "site %s: the coordinator refused the connection or could not be reached (it "
            "refuses a key whose earlier session still looks alive); retrying once in "
            "%.0f s (deployment.rejoin_delay_s)",
            site,
            rejoin_delay_s,
        )
        time.sleep(rejoin_delay_s)
        code, refused = _supernode_refused(command)
    if refused:
        log.error(
            "site %s could not join: check that its key is registered at the coordinator "
            "(flwr supernode register), the address and the CA certificate",
            site,
        )
    return code


def _wait_out_crashed_session(site: SitePaths, delay_s: float) -> None:
    """After a crash, stay away until the coordinator has dropped the dead session.

    A message the dead session had received is never answered: the coordinator only gives up
    on it (``Node Unavailable``, the round goes on without the site) if it sees the node
    offline, which Flower decides after two missed heartbeats (30 s apart). Reconnecting
    sooner would keep the node "online" and leave that round waiting for its timeout.
    """
    if site.work.session_marker.is_file():
        log.warning(
            "site %s: its previous session did not end cleanly (killed or crashed); "
            "waiting %.0f s so that the coordinator drops it before the site rejoins "
            "(deployment.rejoin_delay_s)",
            site.name,
            delay_s,
        )
        time.sleep(delay_s)


def run_site(cfg: DictConfig) -> NoReturn:
    """Preprocess (unchanged files are skipped), then become the site's SuperNode."""
    site = configured_site(cfg)
    command = supernode_command(cfg.deployment, node_config(site, cfg))
    preprocess_consented(site, cfg.preprocess)  # logs the site's summary
    _wait_out_crashed_session(site, float(cfg.deployment.rejoin_delay_s))
    log.info("site %s connecting to the coordinator at %s", site.name, cfg.deployment.superlink)
    if cfg.governance.auto_approve_simulated_sites:
        log.warning(
            "site %s approves every undecided job automatically "
            "(governance.auto_approve_simulated_sites): for demo sites only",
            site.name,
        )
    marker = site.work.session_marker
    marker.write_text(f"{os.getpid()}\n")  # removed on any exit but a kill
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        code = run_supernode(command, site.name, float(cfg.deployment.rejoin_delay_s))
    finally:
        marker.unlink(missing_ok=True)
    sys.exit(code)
