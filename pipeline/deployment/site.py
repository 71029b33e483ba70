"""A site: preprocess its own data if needed, then run Flower's SuperNode on its cache.

The SuperNode dials out to the coordinator (no inbound port at the hospital), proves its
identity with the site's private key, verifies the coordinator against the federation CA,
and queues every message it receives; the site process itself answers them with fedrad's
installed ClientApp on its work folder (:class:`pipeline.contracts.messages.NodeConfig`),
the training stack loaded once (:mod:`pipeline.deployment.warm_runtime`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, NoReturn

from omegaconf import DictConfig

from pipeline.contracts.layout import SitePaths, WorkDir
from pipeline.contracts.messages import NodeConfig
from pipeline.deployment import flower_cli, flower_supernode
from pipeline.deployment.processes import become_subreaper, spawn, stop_children, stop_group, stop_tree
from pipeline.deployment.transport import supernode_security_args
from pipeline.deployment.warm_runtime import WarmRuntime, write_secret
from pipeline.federation import site_task  # noqa: F401  (Lightning, MONAI, Opacus: imported once per site)
from pipeline.federation.client_app import app
from pipeline.governance.revocation import preprocess_consented

log = logging.getLogger("fedrad.deployment")


def configured_site(cfg: DictConfig) -> SitePaths:
    """The site described by its site file (``--config-dir <folder> +site=<name>`` reads
    ``<folder>/site/<name>.yaml``; ``conf/site/demo_site*.yaml`` are examples)."""
    if cfg.get("site") is None:
        raise ValueError(
            "no site selected: pass --config-dir <folder> +site=<name> for your site file "
            "<folder>/site/<name>.yaml (e.g. +site=demo_site1 for the demo), which names this "
            "site's data folders, keys, privacy budget and approval policy"
        )
    return SitePaths.of_site_file(cfg.site)


def node_config(site: SitePaths, cfg: DictConfig) -> NodeConfig:
    """The site's own settings for its SuperNode, all from its site file: its name and work
    folder, its approval policy (``policy``) and its standing privacy budget (``epsilon_budget``,
    a cap on every job's spending, none when null)."""
    site_file = cfg.get("site") or {}
    policy = site_file.get("policy") or {}
    budget = site_file.get("epsilon_budget")
    defaults = NodeConfig(work_dir=site.work_dir)
    return NodeConfig(
        work_dir=site.work_dir,
        site_name=site.name,
        require_approval=bool(policy.get("require_approval", defaults.require_approval)),
        auto_approve=bool(policy.get("auto_approve", defaults.auto_approve)),
        allow_seeded_noise=bool(policy.get("allow_seeded_noise", defaults.allow_seeded_noise)),
        retrain_round=str(policy.get("retrain_round", defaults.retrain_round)),
        epsilon_budget=None if budget is None else float(budget),
    )


def supernode_command(dep: DictConfig, node: NodeConfig, secret: Path) -> list[str]:
    """``flower-supernode`` for one site, asking for messages every ``deployment.poll_s``
    (:mod:`.flower_supernode`), with the site's own settings (:class:`NodeConfig`); it starts
    no ClientApp process: the site runs its messages itself (:mod:`.warm_runtime`), asking for
    them with ``secret``."""
    command = [
        *flower_supernode.command(float(dep.poll_s)),
        "--superlink",
        str(dep.superlink),
        *supernode_security_args(dep),
        "--node-config",
        node.flag(),
        "--port",
        str(dep.supernode_port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
    ]
    if dep.max_wait_s is not None:
        command += ["--max-wait-time", str(dep.max_wait_s)]
    return command


# What flower-supernode prints (it exits with status 1) when the SuperLink cannot be reached or
# refuses to activate the node, e.g. a restarted site whose previous session still looks alive.
CONNECTION_ERROR = "Exit Code: 305"
REPLY_SENT = "Sent successfully"  # what it prints once a reply has reached the coordinator
# What it prints while it retries the coordinator, and what shows that it got through again.
RETRYING = "Connection attempt failed"
GOT_THROUGH = re.compile(r"Connection successful|SuperNode ID|Receiving:|Sent successfully")
# What it prints when it gives up on the coordinator while running on: an HTTP 5xx that Flower
# does not retry, or a connection closed during the TLS handshake or mid-request (a relay or
# proxy whose upstream is down, a coordinator killed while the site sends its reply), which
# Flower takes for a TLS error and stops retrying, at the first try as well as after several.
# The SuperNode then stops pulling messages without exiting: the site restarts it.
GAVE_UP = re.compile(r"Server error '5\d\d|Giving up reconnection|SSL/TLS handshake error detected")
GAVE_UP_GRACE_S = 10.0  # a loaded machine may take seconds to print a traceback
LOOPBACK = "127.0.0.1,::1"


def keep_loopback_off_the_proxy() -> None:
    """An outbound proxy (``HTTPS_PROXY``) carries the site's connection to the coordinator,
    never the loopback calls between the site and its own SuperNode (``NO_PROXY``, for this
    process and the SuperNode it starts)."""
    for key in ("NO_PROXY", "no_proxy"):
        os.environ[key] = ",".join(filter(None, [os.environ.get(key, ""), LOOPBACK]))


class SuperNodeSession:
    """One SuperNode process (in its own process group, see :mod:`pipeline.deployment.processes`),
    its output echoed once, stopped early when the federation tells the site it is finished."""

    def __init__(
        self, command: list[str], work: WorkDir, exit_when_finished: bool, stuck_after_s: float
    ) -> None:
        self.command = command
        self.work = work
        self.exit_when_finished = exit_when_finished
        self.stuck_after_s = stuck_after_s
        self.retrying_since: float | None = None
        self.refused = False
        self.broken = False
        self.finished = False
        self.last_sent = 0.0  # when the SuperNode last reported a reply sent

    def _echo(self, process: subprocess.Popen, output: IO[str]) -> None:
        for line in output:
            sys.stdout.write(line)
            sys.stdout.flush()
            if CONNECTION_ERROR in line:
                self.refused = True
            if REPLY_SENT in line:
                self.last_sent = time.time()
            if GOT_THROUGH.search(line):
                self.retrying_since = None
            elif RETRYING in line and self.retrying_since is None:
                self.retrying_since = time.monotonic()
            since = self.retrying_since
            stuck = since is not None and time.monotonic() - since > self.stuck_after_s
            if (GAVE_UP.search(line) or stuck) and not self.broken:
                self.broken = True
                threading.Thread(target=self._stop_gave_up, args=(process,), daemon=True).start()

    @staticmethod
    def _stop_gave_up(process: subprocess.Popen) -> None:
        """Stop a SuperNode that gave up once it has printed why (a TLS failure's certificate
        error follows the line that gave up) or exited by itself, at most GAVE_UP_GRACE_S."""
        try:
            process.wait(timeout=GAVE_UP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        stop_tree(process)

    def _watch_finished(self, process: subprocess.Popen, since: float) -> None:
        """Stop the SuperNode once the ClientApp records a finished federation and the
        SuperNode has sent its answer (or after 60 s)."""
        while process.poll() is None:
            marker = self.work.federation_finished
            if marker.is_file() and (written := marker.stat().st_mtime) >= since:
                deadline = time.monotonic() + 60
                while self.last_sent < written and time.monotonic() < deadline and process.poll() is None:
                    time.sleep(0.5)
                self.finished = True
                stop_tree(process)
                return
            time.sleep(1)

    def run(self) -> int:
        """Run the SuperNode until it exits (or the federation finishes); its exit status."""
        since = time.time()
        process = spawn(
            self.command,
            env=flower_cli.flower_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        # A killed site's successor stops what is left of this process group.
        self.work.session_marker.write_text(f"{os.getpid()} {process.pid}\n")
        assert process.stdout is not None  # stdout=subprocess.PIPE
        echo = threading.Thread(target=self._echo, args=(process, process.stdout), daemon=True)
        echo.start()
        if self.exit_when_finished:
            watch = threading.Thread(target=self._watch_finished, args=(process, since), daemon=True)
            watch.start()
        try:
            code = process.wait()
        finally:
            stop_tree(process)  # its SuperExec and any ClientApp still running
        echo.join(timeout=10)
        return 0 if self.finished else code


def serve(site: SitePaths, command: list[str], dep: DictConfig) -> int:
    """Run the SuperNode, restarting it after every failure (``deployment.max_restarts``, null:
    forever) until the federation is finished; the site's exit status.

    A restart waits ``deployment.rejoin_delay_s``: Flower refuses to activate a key whose
    earlier session has not yet missed two heartbeats (30 s apart), and a coordinator only gives
    up on a message the dead session held once it sees that session offline.
    """
    restarts = 0
    max_restarts = dep.get("max_restarts")
    delay = float(dep.rejoin_delay_s)
    while True:
        session = SuperNodeSession(command, site.work, bool(dep.exit_when_finished), float(dep.stuck_after_s))
        code = session.run()
        if session.finished:
            log.info("site %s: the federation it joined is finished; the site stops", site.name)
            return 0
        if max_restarts is not None and restarts >= int(max_restarts):
            log.error(
                "site %s could not stay connected (SuperNode exit code %s, %d restarts, "
                "deployment.max_restarts): check that its key is registered at the coordinator "
                "(flwr supernode register), the address, the proxy and the CA certificate",
                site.name,
                code,
                restarts,
            )
            return code or 1
        restarts += 1
        if session.refused:
            why = "the coordinator refused the connection or could not be reached"
        elif session.broken:
            why = (
                "its SuperNode gave up on the coordinator, or kept failing to reach it for "
                "deployment.stuck_after_s (a server error, a dropped connection, a restarted coordinator)"
            )
        else:
            why = f"its SuperNode exited with code {code}"
        log.warning(
            "site %s: %s; reconnecting in %.0f s (restart %d, deployment.rejoin_delay_s)",
            site.name,
            why,
            delay,
            restarts,
        )
        time.sleep(delay)


def warm_runtime(dep: DictConfig, secret: Path) -> WarmRuntime:
    """The site's ClientApp runtime (the training stack, imported with this module, stays
    loaded for the life of the site)."""
    return WarmRuntime(f"127.0.0.1:{int(dep.supernode_port)}", secret, app)


def _clear_crashed_session(site: SitePaths, delay_s: float) -> None:
    """After a crash: stop what is left of the dead session's Flower processes, then stay away
    until the coordinator has dropped that session (see :func:`serve`)."""
    marker = site.work.session_marker
    if not marker.is_file():
        return
    groups = [int(word) for word in marker.read_text().split()[1:]]
    stopped = sum(stop_group(group) for group in groups)
    if stopped:
        log.warning("site %s: stopped %d Flower processes its killed session left", site.name, stopped)
    log.warning(
        "site %s: its previous session did not end cleanly (killed or crashed); waiting %.0f s "
        "so that the coordinator drops it before the site rejoins (deployment.rejoin_delay_s)",
        site.name,
        delay_s,
    )
    time.sleep(delay_s)


def run_site(cfg: DictConfig) -> NoReturn:
    """Preprocess (unchanged files are skipped), then serve as the site's SuperNode until the
    federation is finished (exit 0), or until it stops on SIGTERM."""
    site = configured_site(cfg)
    dep = cfg.deployment
    node = node_config(site, cfg)
    preprocess_consented(site, cfg.preprocess)  # logs the site's summary
    become_subreaper()
    _clear_crashed_session(site, float(dep.rejoin_delay_s))
    keep_loopback_off_the_proxy()
    secret = write_secret(site.work.runtime_secret)
    command = supernode_command(dep, node, secret)
    runtime = warm_runtime(dep, secret)
    log.info("site %s connecting to the coordinator at %s", site.name, dep.superlink)
    if node.auto_approve:
        log.warning(
            "site %s approves every undecided job automatically (its site file's "
            "policy.auto_approve): for demo sites only",
            site.name,
        )
    marker = site.work.session_marker  # removed on any exit but a kill
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        runtime.start()
        code = serve(site, command, dep)
    finally:
        marker.unlink(missing_ok=True)
        stop_children()
        runtime.stop()
    sys.exit(code)
