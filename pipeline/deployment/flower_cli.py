"""Flower's own command-line tools, driven for one federation.

Flower's CLI (``flwr run``, ``flwr supernode register``) reads its SuperLink connection from
``$FLWR_HOME/config.toml``; fedrad keeps that folder under ``deployment.state_dir`` so that
nothing is written to the operator's home directory. ``flwr run`` submits an *app bundle*:
a folder with one ``pyproject.toml`` naming fedrad's installed ServerApp and ClientApp. It
carries no code, so every machine runs the fedrad it has installed, and runtime dependency
installation stays off (the SuperLink is started with it disabled).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.contracts.messages import CONFIG_KEY, OUTPUT_DIR_KEY

CONNECTION = "fedrad"
SERVER_APP = "pipeline.federation.server_app:app"
CLIENT_APP = "pipeline.federation.client_app:app"


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment Flower's tools run in: this interpreter's scripts first on PATH
    (the SuperLink and SuperNode start ``flower-superexec`` and ``flwr-*app`` from PATH),
    telemetry off, and ``FLWR_HOME`` when given."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_tool(name: str) -> str:
    """Absolute path of one of Flower's executables installed next to this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install fedrad's dependencies (flwr) in this environment")
    return str(path)


def write_connection(flwr_home: Path, address: str, root_certificate: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` pointing the CLI at the coordinator's SuperLink.

    ``root_certificate`` None means plain text (``insecure = true``).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{root_certificate.resolve()}"'
        if root_certificate is not None
        else "insecure = true"
    )
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )
    return path


def write_app_bundle(app_dir: Path, experiment_file: Path, output_dir: Path) -> Path:
    """The folder ``flwr run`` submits: fedrad's app components and this run's config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools>=68"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        'name = "fedrad-federation"\n'
        'version = "0.1.0"\n'
        'description = "fedrad ServerApp and ClientApp (code installed on every machine)"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedrad"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{SERVER_APP}"\n'
        f'clientapp = "{CLIENT_APP}"\n\n'
        "[tool.flwr.app.config]\n"
        f'{CONFIG_KEY} = "{experiment_file.resolve()}"\n'
        f'{OUTPUT_DIR_KEY} = "{output_dir.resolve()}"\n'
    )
    return app_dir


def flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> str:
    """Run ``flwr <args>`` against the federation's SuperLink; its stdout, or an error."""
    done = subprocess.run(
        [flower_tool("flwr"), *args],
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`flwr {' '.join(args)}` failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def register_command(flwr_home: Path, public_key: Path, site: str) -> str:
    """The shell line a coordinator operator runs once per site to admit its SuperNode."""
    return f"FLWR_HOME={flwr_home} flwr supernode register {public_key} --name {site}"


def register_site(flwr_home: Path, public_key: Path, site: str) -> None:
    """Admit a site's SuperNode (what :func:`register_command` prints, done in-process)."""
    flwr(["supernode", "register", str(public_key), "--name", site], flwr_home)


def started_run_id(output: str) -> int | None:
    """The run id in ``flwr run``'s "Successfully started run <id>" line."""
    match = re.search(r"started run (\d+)", output)
    return int(match.group(1)) if match else None


def run_status(flwr_home: Path, run_id: int) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    listing = json.loads(flwr(["ls", "--run-id", str(run_id), "--format", "json"], flwr_home))
    return str(listing["runs"][0]["status"])


def stream_run(flwr_home: Path, app_dir: Path) -> int:
    """Submit the app bundle with ``flwr run --stream``, echo the ServerApp's log until the
    run ends, and return the run id."""
    command = [flower_tool("flwr"), "run", str(app_dir), "--stream"]
    process = subprocess.Popen(
        command,
        env=flower_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_id = None
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        run_id = run_id or started_run_id(line)
    if process.wait() != 0 or run_id is None:
        raise RuntimeError(f"`flwr run {app_dir}` failed (exit code {process.returncode}); see above")
    return run_id


def unfinished_runs(flwr_home: Path) -> list[int]:
    """Runs the SuperLink's database still lists as not finished (a coordinator crash)."""
    listing = json.loads(flwr(["ls", "--format", "json"], flwr_home))
    return [
        int(run["run-id"]) for run in listing.get("runs", []) if not str(run["status"]).startswith("finished")
    ]


def stop_run(flwr_home: Path, run_id: int) -> None:
    flwr(["stop", str(run_id)], flwr_home)
