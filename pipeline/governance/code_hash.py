"""One fingerprint of the code a machine runs: what a data owner approves, what a ledger records.

The code hash covers everything that runs at a site:

* the source files of the installed ``pipeline``, ``models`` and ``transforms`` packages;
* the repository's ``scripts/`` folder, when there is one: the scripts are no package, so they
  are looked for next to the installed ``pipeline`` package, i.e. only where fedrad runs from a
  checkout (an editable install: ``pipeline``'s parent folder holds ``pyproject.toml`` and
  ``scripts/``). A wheel install has no scripts folder and the hash covers the packages only;
* ``name==version`` of every Python distribution installed in the environment (its
  site-packages folders), sorted: torch, flwr, opacus, cryptography, ... and fedrad itself. A
  site with any other package version computes another hash, so another job hash.

Files are named by their path (``pipeline/...``, ``scripts/...``) and hashed by content; caches
(``__pycache__``, ``*.pyc``) are left out. The hash is computed once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import site
import sys
import sysconfig
from functools import cache
from importlib import metadata
from pathlib import Path

CODE_PACKAGES = ("pipeline", "models", "transforms")
SCRIPTS_DIR = "scripts"
CODE_HASH_COVERS = (
    "the installed pipeline/, models/ and transforms/ sources, the repository's scripts/ (when "
    "fedrad runs from a checkout) and the name==version of every installed Python distribution"
)


def _files_under(root: Path, prefix: str) -> list[tuple[str, Path]]:
    """``(prefix/relative name, path)`` of every file under ``root`` but caches, sorted."""
    files = [
        path
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    return sorted((f"{prefix}/{path.relative_to(root).as_posix()}", path) for path in files)


def _package_dir(package: str) -> Path:
    """The folder of the installed package ``package``."""
    file = importlib.import_module(package).__file__
    if file is None:
        raise TypeError(f"package {package!r} has no __file__ (a namespace package?)")
    return Path(file).parent


def _source_files(package: str) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every source file of an installed package, sorted."""
    return _files_under(_package_dir(package), package)


def scripts_folder(package_dir: Path | None = None) -> Path | None:
    """The repository's ``scripts/`` folder next to the installed ``pipeline`` package (or
    ``package_dir``) when that is a checkout (``pyproject.toml`` beside it); else ``None``."""
    if package_dir is None:
        package_dir = _package_dir("pipeline")
    root = Path(package_dir).resolve().parent
    folder = root / SCRIPTS_DIR
    return folder if (root / "pyproject.toml").is_file() and folder.is_dir() else None


def code_files() -> list[tuple[str, Path]]:
    """``(name, path)`` of every file the code hash covers: the packages, then the scripts."""
    files = [item for package in CODE_PACKAGES for item in _source_files(package)]
    scripts = scripts_folder()
    return files + (_files_under(scripts, SCRIPTS_DIR) if scripts is not None else [])


def _environment_paths() -> list[str]:
    """The ``sys.path`` entries that are the environment's site-packages folders (not the
    working directory, where a stray ``*.egg-info`` of a checkout may lie)."""
    site_dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        site_dirs.add(site.getusersitepackages())
    wanted = {os.path.realpath(d) for d in site_dirs}
    paths = [p for p in sys.path if p and os.path.realpath(p) in wanted]
    return paths or [p for p in sys.path if p]


def installed_distributions() -> list[str]:
    """``name==version`` of every distribution installed in the environment, sorted; names
    normalised (PEP 503), the first found per name (the one imported) kept."""
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=_environment_paths()):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), str(dist.version))
    return sorted(f"{name}=={version}" for name, version in found.items())


def digest_of(files: list[tuple[str, Path]], distributions: list[str]) -> str:
    """SHA-256 over the files' names and contents and the ``name==version`` lines."""
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(b"file\0" + name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for line in distributions:
        digest.update(b"dist\0" + line.encode() + b"\0")
    return digest.hexdigest()


@cache
def code_hash() -> str:
    """SHA-256 over what runs here (see the module docstring): the installed ``pipeline``,
    ``models`` and ``transforms`` sources, the checkout's ``scripts/`` and the installed
    distributions' versions. The same code and environment give the same hash on every machine."""
    return digest_of(code_files(), installed_distributions())
