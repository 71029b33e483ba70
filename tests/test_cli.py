"""Every entry point's --help: its own text, an example, and no training stack imported first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HYDRA_SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("*.py") if "@hydra.main" in p.read_text())
# The argparse entry points: the demo and documentation tools, evaluate.py and the benchmarks.
ARGPARSE_SCRIPTS = sorted(
    p.relative_to(REPO).as_posix()
    for p in [*(REPO / "scripts").glob("*.py"), *(REPO / "scripts" / "bench").glob("*.py")]
    if "@hydra.main" not in p.read_text()
)
PROBE = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as done:
    assert done.code in (0, None), done.code
print("TORCH_IMPORTED=" + str("torch" in sys.modules))
"""


def help_of(path: str) -> subprocess.CompletedProcess:
    """``python <path> --help`` in a probe that also says whether torch was imported."""
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(script=path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("script", HYDRA_SCRIPTS)
def test_help_is_the_scripts_own_and_imports_no_torch(script):
    path = f"scripts/{script}"
    done = help_of(path)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert "TORCH_IMPORTED=False" in text
    assert "\nFor " in text and "Required:" in text  # who it is for, what it needs
    assert f"python {path} " in text  # an example
    assert f"python {path} --cfg job" in text  # how to see the full configuration
    assert "Powered by Hydra" not in text


def test_argparse_entry_point_answers_help_before_the_training_stack():
    done = help_of("scripts/evaluate.py")
    assert done.returncode == 0 and "TORCH_IMPORTED=False" in done.stdout, done.stderr[-2000:]
    assert "--reads" in done.stdout


@pytest.mark.parametrize("path", ARGPARSE_SCRIPTS)
def test_every_argparse_entry_point_says_what_for_whom_and_how_before_torch(path):
    done = help_of(path)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert "TORCH_IMPORTED=False" in text
    assert "\nFor " in text  # who it is for
    assert f"python {path}" in text  # an example
