"""Flower deployment engine on loopback: TLS, SuperNode authentication, resume, docker files.

Every test here is marked ``deployment`` (``pytest -m deployment``). The coordinator and the
sites run as separate processes (:class:`pipeline.support.local_deployment.LoopbackDeployment`),
each in its own process group, stopped in teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from opacus.accountants import RDPAccountant

from pipeline.contracts.layout import SitePaths
from pipeline.deployment.certificates import CoordinatorCerts, SiteKeys, make_federation_certs
from pipeline.deployment.coordinator import superlink_command, wait_for_port
from pipeline.deployment.flower_cli import (
    CLIENT_APP,
    SERVER_APP,
    flower_env,
    flwr,
    write_app_bundle,
    write_connection,
)
from pipeline.deployment.processes import spawn, stop_tree
from pipeline.deployment.warm_runtime import HELD_ALREADY
from pipeline.governance.budget import PrivacyLedger
from pipeline.support.local_deployment import LoopbackDeployment
from pipeline.support.network import ConnectProxy
from pipeline.training.checkpoints import load_checkpoint
from tests.conftest import DEMO_IMAGE_SIZE, FAST_FEDERATION, REPO, compose_config

pytestmark = pytest.mark.deployment

SITES = ["site1", "site2", "site3"]


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    make_federation_certs(root, ["coordinator.test"], SITES)
    return root


def experiment_overrides(
    sites_root: Path, output_dir: Path, min_sites: int = 3, evaluate: bool = False
) -> list[str]:
    """Two quick rounds; federated evaluation only when ``evaluate``."""
    return [
        *FAST_FEDERATION,
        f"data.sites_root={sites_root}",
        "data.sites=[site1,site2,site3]",
        "federation.num_rounds=2",
        f"federation.fraction_evaluate={1.0 if evaluate else 0.0}",
        f"federation.min_sites={min_sites}",
        f"output_dir={output_dir}",
    ]


@pytest.fixture
def deployment(demo_sites, tmp_path, certs_dir) -> Iterator[LoopbackDeployment]:
    """Two rounds over the demo sites, coordinator and sites on loopback."""
    overrides = experiment_overrides(demo_sites.root, tmp_path / "run")
    deployment = LoopbackDeployment(tmp_path, overrides, SITES, certs_dir=certs_dir)
    yield deployment
    deployment.close()


@pytest.fixture
def evaluating_deployment(demo_sites, tmp_path, certs_dir) -> Iterator[LoopbackDeployment]:
    """Two rounds over the demo sites, each evaluated by the sites."""
    overrides = experiment_overrides(demo_sites.root, tmp_path / "run", evaluate=True)
    deployment = LoopbackDeployment(tmp_path, overrides, SITES, certs_dir=certs_dir)
    yield deployment
    deployment.close()


@pytest.fixture
def dropout_deployment(demo_sites, tmp_path, certs_dir) -> Iterator[LoopbackDeployment]:
    """Two rounds that accept two sites' updates but start only when all three are connected."""
    overrides = [
        *experiment_overrides(demo_sites.root, tmp_path / "run", min_sites=2),
        "federation.min_available_sites=3",
    ]
    deployment = LoopbackDeployment(tmp_path, overrides, SITES, certs_dir=certs_dir)
    yield deployment
    deployment.close()


def round_records(output_dir: Path) -> list[dict]:
    path = output_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


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


def _wait_for_log(deployment: LoopbackDeployment, name: str, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in deployment.log(name):
        assert time.monotonic() < deadline, f"{name} never logged {text!r}:\n" + deployment.log(name)[-4000:]
        assert deployment.processes["coordinator"].poll() is None, deployment.log("coordinator")[-4000:]
        time.sleep(0.2)


def test_three_sites_with_tls_and_auth_and_a_killed_site_rejoins(dropout_deployment):
    """Three TLS-authenticated sites; site1 is SIGKILLed while training round 1 and restarted
    at once: round 1 goes on without it, and it trains again in round 2."""
    deployment = dropout_deployment
    deployment.start_coordinator()
    deployment.register_sites()
    for site in SITES:
        deployment.start_site(site)
    _wait_for_log(deployment, "site1", "train message received")  # training its first round
    deployment.kill("site1")
    before_restart = len(deployment.log("site1"))
    deployment.start_site("site1")
    assert deployment.wait_coordinator(timeout=600) == 0, deployment.log("coordinator")[-4000:]
    output_dir = deployment.work_dir / "run"
    rounds = round_records(output_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["sites_trained"] for r in rounds] == [2, 3]
    assert "Node Unavailable" in deployment.log("coordinator")
    restarted = deployment.log("site1")[before_restart:]
    assert "its previous session did not end cleanly" in restarted  # waited out the dead session
    assert "Receiving: train message" in restarted  # then rejoined
    assert (output_dir / "checkpoints" / "round_002.pt").is_file()
    assert (output_dir / "model.pt").is_file()
    assert "deployment.insecure=true" not in deployment.log("coordinator")


def _charged_rounds(sites_root: Path) -> set[int]:
    """Rounds any site has charged to its privacy ledger."""
    ledgers = (
        PrivacyLedger.for_cache(SitePaths.under(sites_root, s).cache(DEMO_IMAGE_SIZE), "rdp") for s in SITES
    )
    return {entry["round"] for ledger in ledgers for entry in ledger.entries}


def _wait_for_mid_round(deployment: LoopbackDeployment, sites_root: Path, timeout: float = 300) -> None:
    """Block until round 1 is completed and a site has charged round 2, which is not completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert deployment.processes["coordinator"].poll() is None, deployment.log("coordinator")[-4000:]
        records = [r["round"] for r in round_records(deployment.work_dir / "run")]
        if records == [1] and 2 in _charged_rounds(sites_root):
            return
        time.sleep(0.1)
    pytest.fail("round 2 never started:\n" + deployment.log("coordinator")[-4000:])


@pytest.fixture
def sites_copy(demo_sites, tmp_path_factory) -> Path:
    """Private copies of the demo sites: a test's privacy ledgers are its own."""
    root = tmp_path_factory.mktemp("sites") / "sites"
    shutil.copytree(demo_sites.root, root)
    return root


@pytest.fixture
def private_deployment(sites_copy, tmp_path, certs_dir) -> Iterator[tuple[LoopbackDeployment, Path]]:
    """Two rounds of DP-SGD over the copied sites."""
    overrides = [
        *experiment_overrides(sites_copy, tmp_path / "run"),
        "privacy=dp_sgd",
        "privacy.noise_multiplier=1.0",
        "privacy.epsilon_budget=1000",
    ]
    deployment = LoopbackDeployment(tmp_path, overrides, SITES, certs_dir=certs_dir)
    yield deployment, sites_copy
    deployment.close()


def test_coordinator_killed_mid_round_resumes(private_deployment):
    """SIGKILL the whole coordinator in round 2 of 2 under DP-SGD; a restart finishes the run
    from round 1's model, and no site's privacy budget is charged twice for round 2."""
    deployment, sites_root = private_deployment
    output_dir = deployment.work_dir / "run"
    deployment.start_coordinator()
    deployment.register_sites()
    for site in SITES:
        deployment.start_site(site)
    _wait_for_mid_round(deployment, sites_root)
    round_1 = (output_dir / "checkpoints" / "round_001.pt").read_bytes()
    deployment.kill("coordinator")  # with its SuperLink and ServerApp
    assert not (output_dir / "checkpoints" / "round_002.pt").exists()

    deployment.start_coordinator()
    assert deployment.wait_coordinator(timeout=420) == 0, deployment.log("coordinator")[-4000:]
    assert "resuming" in deployment.log("coordinator") and "after round 1" in deployment.log("coordinator")
    assert [r["round"] for r in round_records(output_dir)] == [1, 2]
    assert all(r["sites_trained"] == 3 for r in round_records(output_dir))
    assert (output_dir / "checkpoints" / "round_001.pt").read_bytes() == round_1
    final, _ = load_checkpoint(output_dir / "model.pt")  # no evaluation: the last round is released
    last, meta = load_checkpoint(output_dir / "checkpoints" / "round_002.pt")
    assert meta["round"] == 2 and all(torch.equal(final[k], last[k]) for k in last)
    first = torch.load(io.BytesIO(round_1), weights_only=True)["state_dict"]
    assert any(not torch.equal(last[k], first[k]) for k in last)

    run_id = json.loads((output_dir / "run.json").read_text())["run_id"]
    for site in SITES:
        ledger = PrivacyLedger.for_cache(SitePaths.under(sites_root, site).cache(DEMO_IMAGE_SIZE), "rdp")
        assert sorted(f"{e['run']}:{e['round']}" for e in ledger.entries) == [f"{run_id}:{r}" for r in (1, 2)]
        histories = [e["history"] for e in ledger.entries]
        assert histories[0] == histories[1]  # one charge per round
        independent = RDPAccountant()
        independent.history = [tuple(step) for step in histories[0] * 2]
        delta = ledger.entries[-1]["delta"]
        assert ledger.spent(delta) == pytest.approx(independent.get_epsilon(delta), rel=1e-9)


def test_site_behind_a_proxy_joins_sites_are_named_and_stop_when_finished(evaluating_deployment):
    """site1 reaches the coordinator only through an outbound CONNECT proxy on loopback. The
    run finishes; every record and log line names the sites by their registered names; round
    2's training message refers each site to the model it evaluated instead of sending it again;
    each site exits 0 when told the federation is finished, and no process is left."""
    deployment = evaluating_deployment
    proxy = ConnectProxy()
    deployment.start_coordinator()
    deployment.register_sites()
    for site in SITES:
        behind_proxy = site == "site1"  # by name: a proxy is not used for 127.0.0.1
        address = f"localhost:{deployment.port}" if behind_proxy else f"127.0.0.1:{deployment.port}"
        env = {"HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url} if behind_proxy else None
        deployment.start_site(site, [f"deployment.superlink={address}"], env)
    assert deployment.wait_coordinator(timeout=600) == 0, deployment.log("coordinator")[-4000:]
    assert proxy.tunnels and set(proxy.tunnels) == {f"localhost:{deployment.port}"}
    rounds = round_records(deployment.work_dir / "run")
    assert [sorted(r["train_per_site"]) for r in rounds] == [SITES, SITES]
    coordinator = deployment.log("coordinator")
    assert "round 2  site site1  train" in coordinator
    assert coordinator.count("round 2  site site1  train") == 1  # every line printed once
    # Flower's own SuperLink lines name each site too, not only its node id
    assert set(re.findall(r"Activated node_id=\d+ \((\w+)\)", coordinator)) == set(SITES)
    assert not re.search(r"node_id=\d+\b(?! \(site)", coordinator), coordinator[-4000:]
    for site in SITES:
        assert deployment.processes[site].wait(timeout=300) == 0, deployment.log(site)[-3000:]
        log = deployment.log(site)
        assert f"site {site}: the federation it joined is finished" in log
        assert log.count(f"site {site} connecting to the coordinator") == 1
        assert log.count("evaluate message received") == 2, log[-3000:]
        # round 1's training message carries the model; round 2's refers to the one evaluated
        assert re.findall(r"train message received \(run \d+(.*)\)", log) == ["", HELD_ALREADY]
    assert all(sorted(r["val_per_site"]) == SITES for r in rounds)
    deadline = time.monotonic() + 60
    while deployment.leftovers():
        assert time.monotonic() < deadline, deployment.leftovers()
        time.sleep(1)
    proxy.close()


def test_unregistered_site_and_foreign_ca_are_refused(deployment, tmp_path):
    deployment.start_coordinator()
    deployment.register_sites(["site1"])
    foreign = tmp_path / "foreign"
    make_federation_certs(foreign, [], ["site1"])
    no_retry = ["deployment.max_wait_s=20", "deployment.rejoin_delay_s=0", "deployment.max_restarts=0"]
    unregistered = deployment.start_site("site2", no_retry)
    wrong_ca = deployment.start_site(
        "site1", [*no_retry, f"deployment.root_certificate={foreign / 'ca.crt'}"]
    )
    assert unregistered.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.log("site2")
    assert wrong_ca.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("site1")


def test_compose_file_runs_project_entry_points():
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
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        done = subprocess.run(
            ["docker", "compose", "-f", str(compose_file), "config", "--quiet"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr


class HungSuperNode:
    """A SuperNode process that gave up but does not exit by itself."""

    def wait(self, timeout: float) -> int:
        raise subprocess.TimeoutExpired("flower-supernode", timeout)


def test_a_supernode_stuck_retrying_the_coordinator_is_restarted(tmp_path, monkeypatch):
    """Flower retries a coordinator that refuses a restarted session forever (seen after a
    SuperLink restart): a site stops its SuperNode once it has retried for stuck_after_s without
    getting through, and only then."""
    from pipeline.contracts.layout import WorkDir
    from pipeline.deployment import site

    stopped: list[HungSuperNode] = []
    monkeypatch.setattr(site, "stop_tree", stopped.append)
    monkeypatch.setattr(site, "GAVE_UP_GRACE_S", 0.1)
    supernode = HungSuperNode()
    session = site.SuperNodeSession([], WorkDir(tmp_path), exit_when_finished=False, stuck_after_s=0.5)
    retry = "WARNING :   Connection attempt failed, retrying in 2.0 seconds\n"
    session._echo(supernode, io.StringIO(retry))
    time.sleep(0.6)
    got_through = "INFO :      Connection successful after 3.1 seconds and 2 tries.\n"
    session._echo(supernode, io.StringIO(got_through))
    session._echo(supernode, io.StringIO(retry))
    time.sleep(0.2)
    assert not session.broken and stopped == []  # it got through in between
    time.sleep(0.5)
    session._echo(supernode, io.StringIO(retry))
    deadline = time.monotonic() + 5
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.broken and stopped == [supernode]


def test_a_superlink_gone_during_a_listing_is_an_error_to_recover_from(monkeypatch, tmp_path):
    """`flwr ls` against a SuperLink that went away prints an error object with exit status 0:
    the coordinator gets a FlowerCliError (it restarts the SuperLink), not a KeyError that kills it."""
    from pipeline.deployment import flower_cli

    monkeypatch.setattr(flower_cli, "flwr", lambda args, home: '{"success": false, "error-message": "gone"}')
    with pytest.raises(flower_cli.FlowerCliError, match="gone"):
        flower_cli.run_status(tmp_path, 1)
    with pytest.raises(flower_cli.FlowerCliError):
        flower_cli.unfinished_runs(tmp_path)
    monkeypatch.setattr(
        flower_cli, "flwr", lambda args, home: '{"runs": [{"run-id": 7, "status": "running"}]}'
    )
    assert flower_cli.unfinished_runs(tmp_path) == [7]


EVIL_CLIENT = """
from pathlib import Path
from flwr.clientapp import ClientApp
Path({marker!r}).write_text("the coordinator's code ran at the site")
app = ClientApp()
"""
EVIL_SERVER = """
import json, time
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp
app = ServerApp()

@app.main()
def main(grid, context):
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    asked = [Message(content=RecordDict(), dst_node_id=node, message_type="train") for node in nodes]
    replies = list(grid.send_and_receive(asked, timeout=300))
    answers = [reply.error.reason if reply.has_error() else "answered" for reply in replies]
    Path({result!r}).write_text(json.dumps(answers))
"""


def test_a_coordinator_cannot_make_a_site_run_its_code(demo_sites, tmp_path):
    """A coordinator submits an app bundle whose ClientApp is its own code: the site runs only
    its installed ClientApp, whose gate refuses the message; the bundle's module never runs."""
    marker, result, app_dir = tmp_path / "evil_ran", tmp_path / "answers.json", tmp_path / "evil_app"
    app_dir.mkdir()
    (app_dir / "evil_client.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    (app_dir / "evil_server.py").write_text(EVIL_SERVER.format(result=str(result)))
    bundle = write_app_bundle(app_dir, tmp_path / "experiment.yaml", tmp_path / "run") / "pyproject.toml"
    bundle.write_text(
        bundle.read_text().replace(SERVER_APP, "evil_server:app").replace(CLIENT_APP, "evil_client:app")
    )
    overrides = experiment_overrides(demo_sites.root, tmp_path / "run")
    deployment = LoopbackDeployment(tmp_path, overrides, ["site1"], insecure=True)
    cfg = compose_config(*deployment.overrides)
    with open(tmp_path / "superlink.log", "w") as out:
        superlink = spawn(
            superlink_command(cfg.deployment), env=flower_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(f"127.0.0.1:{deployment.port}", superlink)
        flwr_home = tmp_path / "flwr_home"
        write_connection(flwr_home, f"127.0.0.1:{deployment.port}", None)
        deployment.start_site("site1")
        flwr(["run", str(app_dir)], flwr_home)
        deadline = time.monotonic() + 600
        while not result.is_file():
            assert time.monotonic() < deadline, deployment.log("site1")[-4000:]
            time.sleep(0.5)
    finally:
        deployment.close()
        stop_tree(superlink)
    assert not marker.exists()
    [answer] = json.loads(result.read_text())
    assert "experiment" in answer  # refused by the site's approval gate: no experiment named
    assert "refused a train message: the message carries no experiment" in deployment.log("site1")


def test_a_supernode_whose_send_died_in_tls_is_restarted(tmp_path, monkeypatch):
    """A coordinator killed while a site sends its reply: Flower gives up at the first try on
    what it takes for a TLS error and its SuperNode stops pulling without exiting (lines as
    seen in the chaos test); the site restarts it."""
    from pipeline.contracts.layout import WorkDir
    from pipeline.deployment import site

    stopped: list[HungSuperNode] = []
    monkeypatch.setattr(site, "stop_tree", stopped.append)
    monkeypatch.setattr(site, "GAVE_UP_GRACE_S", 0.1)
    supernode = HungSuperNode()
    session = site.SuperNodeSession([], WorkDir(tmp_path), exit_when_finished=False, stuck_after_s=180)
    session._echo(supernode, io.StringIO("INFO :      Sending: train message (ID: c675058f)\n"))
    assert not session.broken
    died = (
        "ERROR :     SSL/TLS handshake error detected.\n"
        "ERROR :     Failed to send message c675058f: [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred\n"
    )
    session._echo(supernode, io.StringIO(died))
    deadline = time.monotonic() + 5
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.broken and stopped == [supernode]


def test_the_coordinator_shows_the_superlinks_warnings_and_site_lines_named_without_colour(tmp_path):
    """Flower's per-call INFO lines stay off the console unless verbose; a traceback goes with
    its error line; node ids carry the registered name (int64 in the database, as Flower stores them)."""
    import sqlite3

    from pipeline.deployment.superlink_log import NamedNodeLog

    database = tmp_path / "superlink.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE node (node_id INTEGER, name TEXT)")
        db.execute("INSERT INTO node VALUES (?, ?)", (-2, "site1"))  # uint64 2**64 - 2
    lines = [
        "\x1b[92mINFO \x1b[0m:      [ServerAppIo.PullMessages]\n",
        f"\x1b[92mINFO \x1b[0m:      [Fleet.ActivateNode] Activated node_id={2**64 - 2}\n",
        "\x1b[91mERROR \x1b[0m:     Unexpected failure\n",
        "Traceback (most recent call last):\n",
        "\x1b[92mINFO \x1b[0m:      [Fleet.PushMessages]\n",
    ]
    quiet, verbose = io.StringIO(), io.StringIO()
    NamedNodeLog(database).echo(lines, quiet)
    NamedNodeLog(database, verbose=True).echo(lines, verbose)
    assert quiet.getvalue() == (
        f"INFO :      [Fleet.ActivateNode] Activated node_id={2**64 - 2} (site1)\n"
        "ERROR :     Unexpected failure\nTraceback (most recent call last):\n"
    )
    assert len(verbose.getvalue().splitlines()) == 5 and "\x1b" not in verbose.getvalue()
