"""The simulation on a Ray cluster (``federation.ray_address``): a head and a worker node started
on loopback by the test, the demo federation run on them, both nodes stopped afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipeline.contracts.layout import RunLayout
from tests.conftest import REPO, one_round_command

RAY = Path(sys.executable).parent / "ray"
STARTED = "This command will now block forever"  # `ray start --block`, once the node is up
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_node(log: Path, *options: str) -> subprocess.Popen:
    """``ray start --block`` with one CPU on loopback; returns once the node is up."""
    command = [
        str(RAY),
        "start",
        "--block",
        "--num-cpus=1",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}",
        *options,
    ]
    with log.open("w") as out:
        node = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    while STARTED not in log.read_text():
        if node.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return node


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head and a worker node (one CPU each) on loopback; yields the head's address and, at the
    end, stops both and checks that none of their processes is left."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    nodes = [
        start_node(
            temp / "head.log",
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        )
    ]
    try:
        nodes.append(start_node(temp / "worker.log", f"--address=127.0.0.1:{port}"))
        yield f"127.0.0.1:{port}"
    finally:
        processes = [
            p for node in nodes for p in [psutil.Process(node.pid), *psutil.Process(node.pid).children(True)]
        ]
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=120)
        for process in alive:
            process.kill()
        assert not alive, f"Ray processes left after stopping the nodes: {[p.pid for p in alive]}"
        strays = [
            p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])
        ]
        assert not strays, f"processes still using {temp}: {strays}"
        shutil.rmtree(temp, ignore_errors=True)


def actor_nodes(address: str) -> list[str]:
    """The node of every Flower ClientApp actor the cluster ran (from Ray's actor table)."""
    query = (
        "import json, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        "actors = ray._private.state.actors().values()\n"
        "sites = [a for a in actors if a['ActorClassName'].endswith('ClientAppActor')]\n"
        "print(json.dumps([a['Address']['NodeID'] for a in sites]))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", query], env=ENV, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.scale
@pytest.mark.slow
def test_simulation_runs_on_a_ray_cluster_of_two_nodes(demo_sites, ray_cluster, tmp_path):
    command = one_round_command(
        demo_sites.root, tmp_path, "federation.min_sites=3", f"federation.ray_address={ray_cluster}"
    )
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"on the Ray cluster at {ray_cluster}" in done.stdout + done.stderr
    record = json.loads(RunLayout(tmp_path).rounds.read_text().splitlines()[0])
    assert record["sites_trained"] == 3 and len(record["val_per_site"]) == 3
    assert RunLayout(tmp_path).model.is_file()
    assert len(set(actor_nodes(ray_cluster))) == 2  # the sites ran on the head and on the worker
