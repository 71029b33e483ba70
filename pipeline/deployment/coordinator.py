"""The coordinator: Flower's SuperLink with a persistent database, and one fedrad run on it.

``run_coordinator`` starts ``flower-superlink`` (TLS and SuperNode authentication unless
``deployment.insecure``), writes the resolved experiment config into the run's output folder,
submits fedrad's app bundle with ``flwr run`` and waits until the run ends. Runs a previous
coordinator left unfinished in the database (a crash) are stopped first; the new run picks
up from the output folder's last completed round (:mod:`pipeline.deployment.resume`).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.deployment import flower_cli
from pipeline.deployment.certificates import CoordinatorCerts
from pipeline.deployment.transport import superlink_security_args

log = logging.getLogger("fedrad.deployment")

EXPERIMENT_FILE = "experiment.yaml"


@dataclass(frozen=True)
class CoordinatorState:
    """What the coordinator keeps under ``deployment.state_dir``."""

    database: Path
    flwr_home: Path
    app_dir: Path

    @classmethod
    def under(cls, state_dir: str | Path) -> "CoordinatorState":
        root = Path(state_dir)
        return cls(root / "superlink.db", root / "flwr", root / "app")


def local_address(dep: DictConfig) -> str:
    """How tools on the coordinator machine reach its own SuperLink."""
    host = "127.0.0.1" if dep.listen_host in ("0.0.0.0", "::", "") else dep.listen_host
    return f"{host}:{dep.port}"


def write_cli_connection(dep: DictConfig) -> Path:
    """Point Flower's CLI (``flwr run``, ``flwr supernode register``) at this SuperLink."""
    root = None if dep.insecure else CoordinatorCerts.under(dep.certs_dir).ca_cert
    return flower_cli.write_connection(
        CoordinatorState.under(dep.state_dir).flwr_home, local_address(dep), root
    )


def superlink_command(dep: DictConfig) -> list[str]:
    """``flower-superlink`` with every API on one port and state kept on disk."""
    state = CoordinatorState.under(dep.state_dir)
    state.database.parent.mkdir(parents=True, exist_ok=True)
    return [
        flower_cli.flower_tool("flower-superlink"),
        *superlink_security_args(dep),
        "--database",
        str(state.database),
        "--disable-runtime-dependency-installation",
        "--host",
        str(dep.listen_host),
        "--port",
        str(dep.port),
    ]


def wait_for_port(address: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Block until ``host:port`` accepts connections; fail if ``process`` exits first."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see its log above")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"flower-superlink did not listen on {address} within {timeout:.0f}s")


def write_experiment(cfg: DictConfig, output_dir: Path) -> Path:
    """The resolved experiment config the ServerApp reads (kept next to the results)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / EXPERIMENT_FILE
    shared = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k not in ("deployment", "site")])
    OmegaConf.save(shared, path, resolve=True)
    return path


def start_superlink(dep: DictConfig) -> subprocess.Popen:
    """Start the SuperLink and return once it listens."""
    write_cli_connection(dep)
    env = flower_cli.flower_env(CoordinatorState.under(dep.state_dir).flwr_home)
    process = subprocess.Popen(superlink_command(dep), env=env)
    try:
        wait_for_port(local_address(dep), process)
    except Exception:
        process.terminate()
        raise
    return process


def run_coordinator(cfg: DictConfig) -> str:
    """Start the SuperLink, run the experiment to the end, return Flower's final status."""
    dep = cfg.deployment
    state = CoordinatorState.under(dep.state_dir)
    output_dir = Path(cfg.output_dir).resolve()
    experiment = write_experiment(cfg, output_dir)
    flower_cli.write_app_bundle(state.app_dir, experiment, output_dir)
    superlink = start_superlink(dep)
    try:
        for run_id in flower_cli.unfinished_runs(state.flwr_home):
            log.warning("stopping run %d left unfinished by an earlier coordinator", run_id)
            flower_cli.stop_run(state.flwr_home, run_id)
        log.info("SuperLink on %s; submitting %s (outputs in %s)", dep.port, experiment, output_dir)
        run_id = flower_cli.stream_run(state.flwr_home, state.app_dir)
        status = flower_cli.run_status(state.flwr_home, run_id)
        log.info("run %d ended: %s", run_id, status)
        if dep.keep_running:
            log.info("deployment.keep_running=true: the SuperLink stays up (Ctrl-C to stop)")
            superlink.wait()
        return status
    finally:
        if superlink.poll() is None:
            superlink.terminate()
            superlink.wait(timeout=30)
