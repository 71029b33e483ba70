"""The coordinator: Flower's SuperLink with a persistent database, and one fedrad run on it.

``run_coordinator`` starts ``flower-superlink`` (TLS and SuperNode authentication unless
``deployment.insecure``), writes the resolved experiment config into the run's output folder,
submits fedrad's app bundle with ``flwr run`` and waits until the run ends. Runs a previous
coordinator left unfinished in the database (a crash) are stopped first; the new run picks
up from the output folder's last completed round (:mod:`pipeline.federation.resume`). When the
SuperLink, its executor or the ServerApp fails, the coordinator restarts the SuperLink and
submits again, up to ``deployment.max_attempts`` times.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from omegaconf import DictConfig, OmegaConf

from pipeline.deployment import flower_cli, flower_superlink
from pipeline.deployment.certificates import CoordinatorCerts
from pipeline.deployment.processes import become_subreaper, spawn, stop_children, stop_tree
from pipeline.deployment.superlink_log import NamedNodeLog
from pipeline.deployment.transport import superlink_security_args
from pipeline.federation.resume import rounds_left

log = logging.getLogger("fedrad.deployment")

EXPERIMENT_FILE = "experiment.yaml"
COMPLETED = "finished:completed"  # Flower's status of a run that ended normally


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
        *flower_superlink.command(),
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


def start_superlink(dep: DictConfig, verbose: bool = False) -> subprocess.Popen:
    """Start the SuperLink (its own process group, killed with this process) once it listens;
    its output echoed with the sites' registered names (:mod:`pipeline.deployment.superlink_log`)."""
    write_cli_connection(dep)
    state = CoordinatorState.under(dep.state_dir)
    env = flower_cli.flower_env(state.flwr_home)
    process = spawn(
        superlink_command(dep),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert process.stdout is not None  # stdout=subprocess.PIPE
    named = NamedNodeLog(state.database, verbose)
    threading.Thread(target=named.echo, args=(process.stdout,), daemon=True).start()
    try:
        wait_for_port(local_address(dep), process)
    except Exception:
        stop_tree(process)
        raise
    return process


@dataclass
class Outcome:
    """How the coordinator's federation ended: Flower's last status and what went wrong on the way."""

    status: str = "not started"
    attempts: int = 0
    incidents: list[str] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    def summary(self, output_dir: Path) -> str:
        """The coordinator's last line: what happened, plainly."""
        recovered = f"; recovered from: {'; '.join(self.incidents)}" if self.incidents else ""
        if self.completed:
            return f"the federation run finished after {self.attempts} attempt(s){recovered}"
        return (
            f"the federation run did not finish: {self.attempts} attempt(s), last status "
            f"{self.status}{recovered}. Completed rounds are kept in {output_dir}: run the same "
            "command again to resume after the last of them"
        )


class SuperLinkWatchdog:
    """Ends the ``flwr run`` stream when the SuperLink or its SuperExec dies, so that the
    coordinator restarts them instead of waiting for a run that nothing executes."""

    def __init__(self, superlink: subprocess.Popen, interval_s: float = 5) -> None:
        self.superlink = superlink
        self.interval_s = interval_s
        self.failure: str | None = None
        self._done = threading.Event()

    def check(self) -> str | None:
        """The failure of the SuperLink or its executor now, if any."""
        try:
            return self._failed()
        except psutil.Error:
            return None

    def _failed(self) -> str | None:
        if self.superlink.poll() is not None:
            return f"the SuperLink exited with code {self.superlink.returncode}"
        try:
            children = psutil.Process(self.superlink.pid).children()
        except psutil.NoSuchProcess:
            return "the SuperLink exited"
        if not any("flower-superexec" in " ".join(c.cmdline()) for c in children if c.is_running()):
            return "the SuperLink's executor (flower-superexec) exited"
        return None

    def watch(self, stream: subprocess.Popen) -> None:
        """Check every ``interval_s`` until :meth:`stop`; terminate ``stream`` on a failure."""

        def loop() -> None:
            while not self._done.wait(self.interval_s):
                try:
                    failure = self._failed()
                except psutil.Error:
                    continue  # a child ended while being listed: look again
                if failure is not None:
                    self.failure = failure
                    stream.terminate()
                    return

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._done.set()


def _attempt(cfg: DictConfig, state: CoordinatorState, superlink: subprocess.Popen) -> tuple[str, str | None]:
    """One submission of the run: Flower's final status and the failure seen, if any (a run
    that Flower calls completed but that left rounds untrained, e.g. a round with too few
    sites, is a failure too)."""
    for left in flower_cli.unfinished_runs(state.flwr_home):
        log.warning("stopping run %d left unfinished by an earlier attempt or coordinator", left)
        flower_cli.stop_run(state.flwr_home, left)
    watchdog = SuperLinkWatchdog(superlink)
    try:
        started = flower_cli.stream_run(state.flwr_home, state.app_dir, watchdog.watch)
    finally:
        watchdog.stop()
    failure = watchdog.failure or watchdog.check()
    if failure is not None or started is None:
        return "not finished", failure or "`flwr run` did not start the run"
    run_id = started
    status = flower_cli.run_status(state.flwr_home, run_id)
    log.info("run %d ended: %s", run_id, status)
    left = rounds_left(Path(cfg.output_dir).resolve(), int(cfg.federation.num_rounds))
    if status == COMPLETED and left == 0:
        return status, None
    if status == COMPLETED:
        return "unfinished", f"run {run_id} ended with {left} round(s) untrained"
    if not status.startswith("finished"):
        flower_cli.stop_run(state.flwr_home, run_id)
    return status, f"run {run_id} ended with status {status}"


def run_coordinator(cfg: DictConfig) -> Outcome:
    """Start the SuperLink and run the experiment to the end, restarting what fails.

    Up to ``deployment.max_attempts`` submissions: after a failure (the SuperLink, its
    executor or the ServerApp died, the run ended other than completed) the SuperLink is
    restarted and the run submitted again; the ServerApp resumes after the last completed
    round (:mod:`pipeline.federation.resume`). Every Flower process started here is stopped
    on the way out (:mod:`pipeline.deployment.processes`).
    """
    dep = cfg.deployment
    state = CoordinatorState.under(dep.state_dir)
    output_dir = Path(cfg.output_dir).resolve()
    experiment = write_experiment(cfg, output_dir)
    flower_cli.write_app_bundle(state.app_dir, experiment, output_dir)
    become_subreaper()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    outcome = Outcome()
    superlink: subprocess.Popen | None = None
    try:
        while outcome.attempts < int(dep.max_attempts):
            outcome.attempts += 1
            if superlink is None:
                superlink = start_superlink(dep, bool(cfg.get("verbose", False)))
                log.info("SuperLink on %s; submitting %s (outputs in %s)", dep.port, experiment, output_dir)
            try:
                outcome.status, failure = _attempt(cfg, state, superlink)
            except flower_cli.FlowerCliError as error:
                outcome.status, failure = "unknown", str(error).splitlines()[0]
            if failure is None:
                break
            outcome.incidents.append(f"attempt {outcome.attempts}: {failure}")
            log.warning(
                "attempt %d of %d: %s; restarting the SuperLink and resuming after the last "
                "completed round (deployment.max_attempts)",
                outcome.attempts,
                dep.max_attempts,
                failure,
            )
            stop_tree(superlink)
            stop_children()  # its executor and ServerApp, orphaned to this process if it died first
            superlink = None
        if outcome.completed and dep.keep_running and superlink is not None:
            log.info("deployment.keep_running=true: the SuperLink stays up (Ctrl-C to stop)")
            superlink.wait()
        return outcome
    finally:
        if superlink is not None:
            stop_tree(superlink)
        stop_children()
