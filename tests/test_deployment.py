"""Flower deployment engine on loopback: TLS, SuperNode authentication, resume, docker files.

Every test here is marked ``deployment`` (``pytest -m deployment``). Spawned processes run in
their own process groups and are killed in teardown.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from opacus.accountants import RDPAccountant

from pipeline.deployment.certificates import CoordinatorCerts, SiteKeys, make_federation_certs
from pipeline.deployment.coordinator import CoordinatorState, start_superlink
from pipeline.checkpoints import load_checkpoint
from pipeline.deployment.flower_cli import flower_env, register_site
from pipeline.privacy.ledger import PrivacyLedger
from pipeline.sites import SitePaths
from tests.conftest import FAST_FEDERATION, REPO, compose_config

pytestmark = pytest.mark.deployment

SITES = ["site1", "site2", "site3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Processes a test starts, each in its own process group, with their logs."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def script(self, name: str, overrides: list[str], log_name: str) -> subprocess.Popen:
        command = [sys.executable, str(REPO / "scripts" / name), *overrides]
        return self.spawn(command, log_name)

    def spawn(self, command: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{log_name}.log", "w")
        process = subprocess.Popen(
            command, cwd=REPO, env=flower_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def log(self, log_name: str) -> str:
        return (self.log_dir / f"{log_name}.log").read_text(errors="replace")

    def kill_all(self) -> None:
        for process in self.started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    make_federation_certs(root, ["coordinator.test"], SITES)
    return root


def deployment_overrides(certs_dir: Path, state_dir: Path, port: int) -> list[str]:
    return [
        f"deployment.certs_dir={certs_dir}", f"deployment.state_dir={state_dir}",
        f"deployment.port={port}",
    ]


def experiment_overrides(sites_root: Path, output_dir: Path, rounds: int = 2) -> list[str]:
    return [
        *FAST_FEDERATION, f"data.sites_root={sites_root}", "data.sites=[site1,site2,site3]",
        f"federation.num_rounds={rounds}", "federation.min_sites=3", f"output_dir={output_dir}",
    ]


def register_all(flwr_home: Path, certs_dir: Path, sites: list[str]) -> None:
    """``flwr supernode register`` for each site, in parallel (each CLI call takes seconds)."""
    threads = [
        threading.Thread(target=register_site, args=(flwr_home, SiteKeys.under(certs_dir, s).public_key, s))
        for s in sites
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def start_site(processes: Processes, site: str, base: list[str], extra: list[str] = ()) -> subprocess.Popen:
    overrides = [*base, f"+site=demo_{site}", f"deployment.supernode_port={free_port()}", *extra]
    return processes.script("site.py", overrides, site)


def test_certificates_chain_and_site_keys(certs_dir):
    certs = CoordinatorCerts.under(certs_dir)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coordinator.test"} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    for site in SITES:
        keys = SiteKeys.under(certs_dir, site)
        load_ssh_private_key(keys.private_key.read_bytes(), password=None)
        assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert oct(keys.private_key.stat().st_mode & 0o777) == "0o600"


def test_three_sites_two_rounds_with_tls_and_auth(demo_sites, certs_dir, tmp_path, processes):
    port = free_port()
    state_dir, output_dir = tmp_path / "state", tmp_path / "run"
    base = [*experiment_overrides(demo_sites.root, output_dir), *deployment_overrides(certs_dir, state_dir, port)]
    coordinator = processes.script("coordinator.py", base, "coordinator")
    flwr_home = CoordinatorState.under(state_dir).flwr_home
    _wait_listening(port, coordinator, processes)
    register_all(flwr_home, certs_dir, SITES)
    for site in SITES:
        start_site(processes, site, base)
    try:
        coordinator.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail("coordinator did not finish:\n" + processes.log("coordinator")[-4000:])
    assert coordinator.returncode == 0, processes.log("coordinator")[-4000:]
    rounds = [json.loads(line) for line in (output_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites_trained"] == 3 for r in rounds)
    assert (output_dir / "checkpoints" / "round_002.pt").is_file()
    assert (output_dir / "model.pt").is_file()


def _round_records(output_dir: Path) -> list[dict]:
    path = output_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _charged_rounds(sites_root: Path) -> set[int]:
    """Rounds any site has charged to its privacy ledger."""
    ledgers = (PrivacyLedger.for_cache(SitePaths.under(sites_root, s).cache_dir, "rdp") for s in SITES)
    return {entry["round"] for ledger in ledgers for entry in ledger.entries}


def _wait_for_mid_round(output_dir: Path, sites_root: Path, coordinator, processes, timeout: float = 300) -> None:
    """Block until round 1 is completed and a site has charged round 2, which is not completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert coordinator.poll() is None, processes.log("coordinator")[-4000:]
        if [r["round"] for r in _round_records(output_dir)] == [1] and 2 in _charged_rounds(sites_root):
            return
        time.sleep(0.1)
    pytest.fail("round 2 never started:\n" + processes.log("coordinator")[-4000:])


def test_coordinator_killed_mid_round_resumes(demo_sites, certs_dir, tmp_path, processes):
    """SIGKILL the whole coordinator in round 2 of 3 under DP-SGD; a restart finishes the run
    from round 1's model, and no site's privacy budget is charged twice for round 2."""
    sites_root = tmp_path / "sites"  # private copies: this test's ledgers are its own
    shutil.copytree(demo_sites.root, sites_root)
    port = free_port()
    state_dir, output_dir = tmp_path / "state", tmp_path / "run"
    base = [
        *experiment_overrides(sites_root, output_dir, rounds=3),
        "privacy=dp_sgd", "privacy.noise_multiplier=1.0", "privacy.epsilon_budget=1000",
        *deployment_overrides(certs_dir, state_dir, port),
    ]
    coordinator = processes.script("coordinator.py", base, "coordinator")
    _wait_listening(port, coordinator, processes)
    register_all(CoordinatorState.under(state_dir).flwr_home, certs_dir, SITES)
    for site in SITES:
        start_site(processes, site, base)
    _wait_for_mid_round(output_dir, sites_root, coordinator, processes)
    round_1 = (output_dir / "checkpoints" / "round_001.pt").read_bytes()
    os.killpg(coordinator.pid, signal.SIGKILL)  # the SuperLink and the ServerApp with it
    coordinator.wait()
    assert not (output_dir / "checkpoints" / "round_002.pt").exists()

    restarted = processes.script("coordinator.py", base, "coordinator")
    try:
        restarted.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail("restarted coordinator did not finish:\n" + processes.log("coordinator")[-4000:])
    log = processes.log("coordinator")
    assert restarted.returncode == 0, log[-4000:]
    assert "resuming" in log and "after round 1" in log
    assert [r["round"] for r in _round_records(output_dir)] == [1, 2, 3]
    assert all(r["sites_trained"] == 3 for r in _round_records(output_dir))
    assert (output_dir / "checkpoints" / "round_001.pt").read_bytes() == round_1
    final, _ = load_checkpoint(output_dir / "model.pt")
    last, meta = load_checkpoint(output_dir / "checkpoints" / "round_003.pt")
    assert meta["round"] == 3 and all(torch.equal(final[k], last[k]) for k in last)
    assert any(not torch.equal(last[k], torch.load(io.BytesIO(round_1))["state_dict"][k]) for k in last)

    run_id = json.loads((output_dir / "run.json").read_text())["run_id"]
    for site in SITES:
        ledger = PrivacyLedger.for_cache(SitePaths.under(sites_root, site).cache_dir, "rdp")
        assert sorted(e["key"] for e in ledger.entries) == [f"{run_id}:{r}" for r in (1, 2, 3)]
        histories = [e["history"] for e in ledger.entries]
        assert histories[0] == histories[1] == histories[2]  # one charge per round
        independent = RDPAccountant()
        independent.history = [tuple(step) for step in histories[0] * 3]
        delta = ledger.entries[-1]["delta"]
        assert ledger.spent(delta) == pytest.approx(independent.get_epsilon(delta), rel=1e-9)


def _wait_listening(port: int, process: subprocess.Popen, processes: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, processes.log("coordinator")[-4000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"nothing listens on {port}:\n" + processes.log("coordinator")[-4000:])


@pytest.fixture
def lone_superlink(certs_dir, tmp_path) -> Iterator[tuple[Path, int]]:
    """A SuperLink with TLS and authentication on which only site1 is registered."""
    port = free_port()
    cfg = compose_config(*deployment_overrides(certs_dir, tmp_path / "state", port))
    superlink = start_superlink(cfg.deployment)
    try:
        register_all(CoordinatorState.under(cfg.deployment.state_dir).flwr_home, certs_dir, ["site1"])
        yield tmp_path / "state", port
    finally:
        superlink.kill()
        superlink.wait()


def test_unregistered_site_and_foreign_ca_are_refused(demo_sites, certs_dir, lone_superlink, tmp_path, processes):
    state_dir, port = lone_superlink
    base = [
        *experiment_overrides(demo_sites.root, tmp_path / "unused"),
        *deployment_overrides(certs_dir, state_dir, port), "deployment.max_wait_s=20",
    ]
    foreign = tmp_path / "foreign"
    make_federation_certs(foreign, [], ["site1"])
    unregistered = start_site(processes, "site2", base)
    wrong_ca = start_site(processes, "site1", base, [f"deployment.root_certificate={foreign / 'ca.crt'}"])
    assert unregistered.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in processes.log("site2")
    assert wrong_ca.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in processes.log("site1")


def test_compose_file_runs_project_entry_points():
    import shutil

    import yaml

    compose_file = REPO / "docker" / "compose.yaml"
    services = yaml.safe_load(compose_file.read_text())["services"]
    assert {"certs", "coordinator", "register", "site1", "site2", "site3"} <= set(services)
    for name, service in services.items():
        command = service["command"]
        text = command if isinstance(command, str) else " ".join(command)
        if name == "register":
            assert "flwr supernode register" in text
            continue
        script = text.split()[1]
        assert text.startswith("python scripts/") and (REPO / script).is_file(), (name, text)
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        done = subprocess.run(["docker", "compose", "-f", str(compose_file), "config", "--quiet"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
