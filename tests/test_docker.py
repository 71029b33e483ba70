"""The docker image built and the compose federation run to the end (marker ``docker``).

Runs only when selected (``pytest -m docker``, ``make docker-test``); skipped, with one line,
where no docker daemon answers. ``make docker-test`` makes an offline
base image first (``mmdebstrap`` + ``docker import``) and passes it with this machine's CA bundle
and pip wheelhouse (``FEDRAD_BASE_IMAGE``, ``CA_BUNDLE``, ``WHEELHOUSE``; see docker/build.sh).
The test builds the image from the tracked files, runs docker/compose.yaml (certificates, a
coordinator and three demo sites with TLS and SuperNode authentication) to a finished run,
checks the outputs, that no private key of the run is in any image layer and that every
service ran as a non-root user, then removes the containers and volumes. It prints
``RESULT {"docker": {...}}`` with the image size and the build and run times.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.docker, pytest.mark.timeout(7200)]  # a first build downloads torch

IMAGE = "fedrad:test"
SERVICES = ["certs", "demo-data", "coordinator", "register", "site1", "site2", "site3"]
EXPERIMENT = "model=small_cnn data.image_size=32 federation.num_rounds=2 federation.fraction_evaluate=0.0"


def docker(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def daemon(request) -> None:
    if "docker" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the docker test runs only with `pytest -m docker` (make docker-test)")
    try:
        answered = docker("info", timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        answered = False
    if not answered:
        pytest.skip("no docker daemon answers here (docs/deployment.md#docker says how to start one)")


@pytest.fixture(scope="module")
def image(daemon) -> dict:
    env = dict(os.environ)
    if env.get("FEDRAD_BASE_IMAGE"):
        env["BASE_IMAGE"] = env["FEDRAD_BASE_IMAGE"]
    start = time.monotonic()
    built = subprocess.run(
        [str(REPO / "docker" / "build.sh"), IMAGE], env=env, capture_output=True, text=True, timeout=3600
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE, text=True).stdout)
    return {"build_s": round(time.monotonic() - start), "image_mb": round(size / 1e6)}


def compose(project: str, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    # Under the vfs storage driver every container starts as a full copy of the image: compose's
    # default 60 s answer timeout is too short for that.
    env = dict(os.environ, FEDRAD_IMAGE=IMAGE, FEDRAD_EXPERIMENT=EXPERIMENT, COMPOSE_HTTP_TIMEOUT="900")
    command = ["docker-compose", "-p", project, "-f", str(REPO / "docker" / "compose.yaml"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def volume_file(project: str, path: str) -> bytes:
    """A file of the run's `federation` volume, read through the image itself."""
    done = docker("run", "--rm", "-v", f"{project}_federation:/federation", IMAGE, "cat", path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def image_files(name: str, saved: Path) -> Iterator[tuple[str, bytes]]:
    """Every regular file of every layer of image ``name``: (layer:path, content), one by one."""
    assert docker("save", "-o", str(saved), name, timeout=1800).returncode == 0
    with tarfile.open(saved) as outer:
        for member in outer.getmembers():
            layer = outer.extractfile(member) if member.name.endswith("layer.tar") else None
            if layer is None:
                continue
            with tarfile.open(fileobj=layer, mode="r|") as inner:
                for item in inner:
                    handle = inner.extractfile(item) if item.isfile() else None
                    if handle is not None:
                        yield f"{member.name}:{item.name}", handle.read()


def test_compose_federation_runs_to_the_end_without_keys_in_the_image(image, tmp_path):
    project = f"fedrad{uuid.uuid4().hex[:8]}"
    try:
        start = time.monotonic()
        up = compose(project, "up", "-d")
        assert up.returncode == 0, up.stderr[-3000:]
        containers = {s: f"{project}_{s}_1" for s in SERVICES}
        for service in ["coordinator", "site1", "site2", "site3"]:
            waited = docker("wait", containers[service], timeout=1800, text=True)
            logs = compose(project, "logs", "--no-color", service).stdout[-3000:]
            assert waited.stdout.strip() == "0", f"{service} exited {waited.stdout}:\n{logs}"
        run_s = round(time.monotonic() - start)

        lines = volume_file(project, "/federation/runs/demo/rounds.jsonl").decode().splitlines()
        rounds = [json.loads(line) for line in lines]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(sorted(r["train_per_site"]) == ["site1", "site2", "site3"] for r in rounds)
        assert volume_file(project, "/federation/runs/demo/model.pt")

        for service, container in containers.items():
            user = docker("inspect", "-f", "{{.Config.User}}", container, text=True).stdout.strip()
            assert user == "fedrad", (service, user)
        assert docker("run", "--rm", IMAGE, "id", "-u", text=True).stdout.strip() != "0"

        keys = [volume_file(project, f"/federation/certs/{name}") for name in ("ca.key", "coordinator.key")]
        keys += [volume_file(project, f"/federation/certs/sites/site{i}.key") for i in (1, 2, 3)]
        scanned = 0
        for path, content in image_files(IMAGE, tmp_path / "image.tar"):
            assert not any(key.strip() in content for key in keys), path
            assert not path.endswith(("ca.key", "coordinator.key", "site_secret.key", "ledger_signing.key"))
            scanned += 1
        print("\nRESULT " + json.dumps({"docker": image | {"run_s": run_s, "files_scanned": scanned}}))
    finally:
        compose(project, "down", "-v", "--remove-orphans")
