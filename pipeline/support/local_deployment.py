"""A whole deployment on one machine: the coordinator and each site as separate processes on
127.0.0.1, running the project's own commands (``scripts/coordinator.py``, ``scripts/site.py``)
with TLS and SuperNode authentication unless ``insecure``. Each site runs from its own site file
written outside the repository, as a hospital's would be. Used by the deployment tests and
benchmarks; a real federation runs the same commands on separate machines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from pipeline.contracts.layout import SitePaths
from pipeline.deployment.certificates import SiteKeys, make_federation_certs
from pipeline.deployment.coordinator import CoordinatorState
from pipeline.deployment.flower_cli import flower_env, register_site
from pipeline.deployment.processes import spawn

MARKER = "FEDRAD_LOOPBACK_DEPLOYMENT"  # in the environment of every process of one deployment

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackDeployment:
    """Certificates, coordinator and sites under ``work_dir`` (logs in ``work_dir/logs``).

    ``overrides`` are the Hydra overrides of the experiment, given to every command; each
    site ``<name>`` runs with its site file ``work_dir/site_files/site/<name>.yaml`` (the demo
    site's folders under ``data.sites_root``, its key and CA, and ``site_settings[<name>]``,
    e.g. a standing ``epsilon_budget``), selected with ``--config-dir ... +site=<name>``.
    """

    def __init__(
        self,
        work_dir: Path,
        overrides: list[str],
        sites: list[str],
        insecure: bool = False,
        certs_dir: Path | None = None,
        site_settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.sites = sites
        self.site_settings = dict(site_settings or {})
        self.insecure = insecure
        self.certs_dir = certs_dir or self.work_dir / "certs"
        self.state_dir = self.work_dir / "state"
        self.port = free_port()
        self.overrides = [
            *overrides,
            f"deployment.certs_dir={self.certs_dir}",
            f"deployment.state_dir={self.state_dir}",
            f"deployment.port={self.port}",
            f"deployment.insecure={str(insecure).lower()}",
        ]
        self.processes: dict[str, subprocess.Popen] = {}
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> str:
        """Everything process ``name`` (``coordinator`` or a site) printed so far."""
        return (self.work_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def _spawn(
        self,
        name: str,
        script: str,
        extra: Sequence[str],
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
    ) -> subprocess.Popen:
        """Run ``scripts/<script> <options> <overrides> <extra>`` in its own process group
        (killed if this process dies), appending to its log."""
        with open(self.work_dir / "logs" / f"{name}.log", "a") as log:
            script_path = str(REPO / "scripts" / script)
            command = [sys.executable, script_path, *options, *self.overrides, *extra]
            environment = flower_env() | {MARKER: str(self.work_dir)} | dict(env or {})
            process = spawn(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def site_file(self, site: str) -> Path:
        """Write site ``site``'s site file (outside the repository); its path."""
        path = self.work_dir / "site_files" / "site" / f"{site}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = SiteKeys.under(self.certs_dir, site)
        paths = SitePaths.under("${data.sites_root}", site)  # the demo layout, under data.sites_root
        settings: dict[str, Any] = {
            "name": site,
            "input_dir": paths.input_dir.as_posix(),
            "labels_csv": paths.labels_csv.as_posix(),
            "work_dir": paths.work_dir.as_posix(),
            "secret_file": paths.secret_file.as_posix(),
            "coordinator": f"127.0.0.1:{self.port}",
            "root_certificate": str(self.certs_dir / "ca.crt"),
            "private_key": str(keys.private_key),
            "epsilon_budget": None,
            "policy": {"require_approval": True, "auto_approve": True},
            **self.site_settings.get(site, {}),
        }
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        return path

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this deployment still running (any process started by its commands,
        however detached, carries :data:`MARKER` in its environment)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARKER) == str(self.work_dir) and process.status() != "zombie":
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def make_certs(self) -> None:
        if not self.insecure and not (self.certs_dir / "ca.crt").is_file():
            make_federation_certs(self.certs_dir, [], self.sites)

    def start_coordinator(self, timeout: float = 90) -> subprocess.Popen:
        """Start the coordinator and return once its SuperLink listens."""
        process = self._spawn("coordinator", "coordinator.py", [])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the coordinator exited:\n" + self.log("coordinator")[-4000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return process
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"nothing listens on port {self.port}:\n" + self.log("coordinator")[-4000:])

    def register_sites(self, sites: list[str] | None = None) -> None:
        """``flwr supernode register`` each site's public key, in parallel."""
        if self.insecure:
            return
        flwr_home = CoordinatorState.under(self.state_dir).flwr_home
        threads = [
            threading.Thread(
                target=register_site, args=(flwr_home, SiteKeys.under(self.certs_dir, s).public_key, s)
            )
            for s in sites or self.sites
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def start_site(
        self, site: str, extra: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """Start site ``site`` from its site file; ``env`` adds to its environment (a proxy)."""
        site_file = self.site_file(site)
        return self._spawn(
            site,
            "site.py",
            [f"+site={site}", f"deployment.supernode_port={free_port()}", *extra],
            env,
            options=["--config-dir", str(site_file.parent.parent)],
        )

    def wait_coordinator(self, timeout: float) -> int:
        """The coordinator's exit code; raises with its log when it does not end in time."""
        try:
            return self.processes["coordinator"].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                "the coordinator did not finish:\n" + self.log("coordinator")[-4000:]
            ) from None

    def kill(self, name: str) -> None:
        """SIGKILL process ``name``'s process group: the command, as a crash would; the Flower
        processes it started die with it (:mod:`pipeline.deployment.processes`)."""
        process = self.processes[name]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def stop(self, name: str, grace_s: float = 20) -> None:
        """SIGTERM process ``name``'s group and let it shut down cleanly; SIGKILL it after
        ``grace_s`` (a site shut down cleanly does not wait out a crashed session when restarted)."""
        process = self.processes[name]
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill(name)

    def close(self) -> None:
        """Stop every process of the deployment, leftovers of killed ones included."""
        for name in list(self.processes):
            self.stop(name)
        for process in self.leftovers():
            try:
                process.kill()
            except psutil.Error:
                pass

    def run(self, timeout: float = 1800) -> None:
        """The whole federation: coordinator, registrations, sites, until the run ends."""
        self.make_certs()
        try:
            self.start_coordinator()
            self.register_sites()
            for site in self.sites:
                self.start_site(site)
            if self.wait_coordinator(timeout) != 0:
                raise RuntimeError("the coordinator failed:\n" + self.log("coordinator")[-4000:])
        finally:
            self.close()
