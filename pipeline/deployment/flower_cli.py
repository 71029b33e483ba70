"""Flower's own command-line tools, driven for one federation.

Flower's CLI (``flwr run``, ``flwr supernode register``) reads its SuperLink connection from
``$FLWR_HOME/config.toml``; fedrad keeps that folder under ``deployment.state_dir`` so that
nothing is written to the operator's home directory. ``flwr run`` submits an *app bundle*:
a folder with one ``pyproject.toml`` naming fedrad's installed ServerApp and ClientApp. It
carries no code, so the coordinator runs the fedrad it has installed, and runtime dependency
installation stays off (the SuperLink is started with it disabled). Sites never read the
bundle: each runs its own installed ClientApp (:mod:`pipeline.deployment.warm_runtime`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.contracts.messages import CONFIG_KEY, OUTPUT_DIR_KEY

CONNECTION = "fedrad"
# How `flwr run --stream` prints the ServerApp's Flower log records ("12/02/2026 06:39:26:INFO:...").
FLOWER_LOG_COPY = re.compile(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")
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


class FlowerCliError(RuntimeError):
    """A ``flwr`` command failed; ``output`` is what it printed."""

    def __init__(self, args: list[str], output: str) -> None:
        super().__init__(f"`flwr {' '.join(args)}` failed:\n{output}")
        self.output = output


def flwr(args: list[str], flwr_home: Path, timeout: float = 120, attempts: int = 3) -> str:
    """Run ``flwr <args>`` against the federation's SuperLink; its stdout.

    A failure is tried again (``attempts`` in all, a few seconds apart): a SuperLink that is
    restarting, or whose database is busy, answers the next call. Raises
    :class:`FlowerCliError` with the last output.
    """
    output = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(2.0 * attempt)
        try:
            done = subprocess.run(
                [flower_tool("flwr"), *args],
                env=flower_env(flwr_home),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            output = f"no answer within {timeout:.0f} s"
            continue
        if done.returncode == 0:
            return done.stdout
        output = done.stdout + done.stderr
    raise FlowerCliError(args, output)


def register_command(flwr_home: Path, public_key: Path, site: str) -> str:
    """The shell line a coordinator operator runs once per site to admit its SuperNode (with
    the ``flwr`` of this environment, whether or not it is activated)."""
    return f"FLWR_HOME={flwr_home} {flower_tool('flwr')} supernode register {public_key} --name {site}"


def register_site(flwr_home: Path, public_key: Path, site: str) -> None:
    """Admit a site's SuperNode (what :func:`register_command` prints, done in-process); a key
    already registered (by an earlier call that got no answer, say) is admitted already."""
    try:
        flwr(["supernode", "register", str(public_key), "--name", site], flwr_home)
    except FlowerCliError as error:
        if "already in use" not in error.output:
            raise


def started_run_id(output: str) -> int | None:
    """The run id in ``flwr run``'s "Successfully started run <id>" line."""
    match = re.search(r"started run (\d+)", output)
    return int(match.group(1)) if match else None


def list_runs(flwr_home: Path, *args: str) -> list[dict]:
    """``flwr ls --format json``'s runs. A SuperLink that went away meanwhile makes ``flwr`` print
    an error object instead (with exit status 0): raises :class:`FlowerCliError` for it."""
    command = ["ls", *args, "--format", "json"]
    output = flwr(command, flwr_home)
    try:
        runs = json.loads(output)["runs"]
    except (ValueError, KeyError, TypeError):
        raise FlowerCliError(command, output) from None
    return list(runs)


def run_status(flwr_home: Path, run_id: int) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    return str(list_runs(flwr_home, "--run-id", str(run_id))[0]["status"])


def stream_run(flwr_home: Path, app_dir: Path, on_start: Callable[[subprocess.Popen], None]) -> int | None:
    """Submit the app bundle with ``flwr run --stream``, echo the ServerApp's log until the run
    ends, and return the run id (None if the run never started).

    Flower's own log records reach the stream in a second copy (:data:`FLOWER_LOG_COPY`) of the
    lines the ServerApp, a descendant of the coordinator's SuperLink, prints on the coordinator's
    console already: they are not echoed again (every line once). ``on_start`` receives the
    ``flwr run`` process (a watchdog may terminate it). Whether the run completed is the
    SuperLink's to say (:func:`run_status`), not the stream's exit code.
    """
    command = [flower_tool("flwr"), "run", str(app_dir), "--stream"]
    process = subprocess.Popen(
        command,
        env=flower_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    on_start(process)
    run_id = None
    assert process.stdout is not None
    for line in process.stdout:
        if not FLOWER_LOG_COPY.match(line):
            sys.stdout.write(line)
        run_id = run_id or started_run_id(line)
    process.wait()
    return run_id


def unfinished_runs(flwr_home: Path) -> list[int]:
    """Runs the SuperLink's database still lists as not finished (a coordinator crash)."""
    runs = list_runs(flwr_home)
    return [int(run["run-id"]) for run in runs if not str(run["status"]).startswith("finished")]


def stop_run(flwr_home: Path, run_id: int) -> None:
    """Stop a run; one that finished meanwhile (Flower's "already finished") is stopped already."""
    try:
        flwr(["stop", str(run_id)], flwr_home, attempts=1)
    except FlowerCliError:
        if not run_status(flwr_home, run_id).startswith("finished"):
            raise
