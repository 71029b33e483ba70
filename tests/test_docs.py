"""The documentation: the configuration reference matches conf/, the site builds, links resolve."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference" / "configuration.md"


def _config_table():
    """scripts/config_table.py as a module (registered first: its dataclass needs that)."""
    if "config_table" not in sys.modules:
        spec = importlib.util.spec_from_file_location("config_table", REPO / "scripts" / "config_table.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["config_table"] = module
        spec.loader.exec_module(module)
    return sys.modules["config_table"]


def _mkdocs() -> list[str] | None:
    """The mkdocs command of this environment, or None when mkdocs is not installed."""
    if importlib.util.find_spec("mkdocs") is not None:
        return [sys.executable, "-m", "mkdocs"]
    found = shutil.which("mkdocs")
    return [found] if found else None


def test_configuration_reference_is_generated_from_conf():
    table = _config_table()
    assert REFERENCE.read_text(encoding="utf-8") == table.render(), (
        "docs/reference/configuration.md differs from what conf/ generates: "
        "run .venv/bin/python scripts/config_table.py and commit the result"
    )


def test_configuration_reference_covers_every_config_file_and_key():
    table = _config_table()
    rows = table.config_rows()
    files = {(r.group, r.option) for r in rows}
    for path in (REPO / "conf").rglob("*.yaml"):
        relative = path.relative_to(REPO / "conf")
        group = table.ROOT_GROUP if len(relative.parts) == 1 else relative.parts[0]
        option = (
            relative.with_suffix("").name
            if len(relative.parts) == 1
            else Path(*relative.parts[1:]).with_suffix("").as_posix()
        )
        assert (group, option) in files, f"conf/{relative} is missing from the reference"
    keyed = {(r.group, r.option, r.key): r for r in rows}
    assert keyed[("federation", "fedavg", "secagg.clipping_range")].default == "8.0"
    assert "FedProx" in keyed[("federation", "fedavg", "proximal_mu")].description
    assert keyed[("trainer", "default", "accelerator")].description == "a GPU when present, else the CPU"
    assert keyed[("privacy", "dp_sgd", "epsilon_budget")].default == "${.target_epsilon}"
    assert keyed[(table.ROOT_GROUP, "config", "defaults")].default.startswith("[data: demo, ")


def test_parse_comments_nesting_lists_and_nulls():
    table = _config_table()
    text = (
        "# The file.\n"
        "# @package _global_\n"
        "\n"
        "# Above a.\n"
        "a: 1  # inline\n"
        "outer:\n"
        "  # Above b.\n"
        "  b: 'x # not a comment'\n"
        "  empty:\n"
        "items:\n"
        "  - one\n"
        "  # Above two.\n"
        "  - two: 2\n"
        "last:\n"
    )
    rows = {r.key: r for r in table.parse_yaml(text, "g", "o")}
    assert rows[""].description == "`@package _global_`. The file."
    assert (rows["a"].default, rows["a"].description) == ("1", "Above a. inline")
    assert (rows["outer.b"].default, rows["outer.b"].description) == ("'x # not a comment'", "Above b.")
    assert rows["outer.empty"].default == "null"
    assert "outer" not in rows  # an undescribed mapping is documented by its keys
    assert rows["items"].default == "[one, two: 2]"
    assert rows["items"].description == "`two: 2`: Above two."
    assert rows["last"].default == "null"


def test_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "## Data attribution" in readme
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" in target:
            continue
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.skipif(_mkdocs() is None, reason="mkdocs is not installed (it comes with the test extra)")
def test_mkdocs_builds_strict(tmp_path):
    result = subprocess.run(
        [
            *_mkdocs(),
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_architecture_module_tree_is_generated_from_the_packages():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "module_tree.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_pipeline_module_is_in_the_architecture_page():
    page = (REPO / "docs" / "architecture.md").read_text()
    for module in (REPO / "pipeline").rglob("*.py"):
        if module.name != "__init__.py":
            assert f" {module.name} " in page or f"{module.name}  " in page, module
