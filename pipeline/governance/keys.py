"""A site's ledger signing key: an Ed25519 key pair made on first use, kept on the site's disk.

``<work dir>/private/ledger_signing.key`` (PKCS#8 PEM, mode 0600) never leaves the site;
``<work dir>/ledger_signing.pub`` (PEM) is what anyone verifying the site's ledger needs.

A key file that is missing (where it must exist), unreadable or not an Ed25519 key raises
:class:`KeyFileError`: one line naming the file and what to do, which the command-line tools
print as is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.contracts.files import write_if_changed
from pipeline.contracts.layout import WorkDir


def private_key_path(work_dir: Path) -> Path:
    return WorkDir(Path(work_dir)).signing_key


def public_key_path(work_dir: Path) -> Path:
    return WorkDir(Path(work_dir)).public_key


def _create_private_key(path: Path) -> None:
    """Write a new key at ``path`` unless one exists; safe when several processes race."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:  # mkstemp creates it with mode 0600
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # fails if another process made the key first: theirs is kept
    except FileExistsError:
        pass
    finally:
        Path(tmp).unlink(missing_ok=True)


class KeyFileError(ValueError):
    """A ledger key file is missing, unreadable or not an Ed25519 key (one line: file and fix)."""


def _read_key_file(path: Path, what: str, fix: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"no {what} at {path}: {fix}") from None
    except OSError as error:
        raise KeyFileError(
            f"cannot read the {what} {path} ({error.strerror or error}): run as the site's user "
            f"or fix the file's permissions; {fix}"
        ) from None
    return data


PRIVATE_KEY_FIX = (
    "restore the site's key from its backup (a new key cannot verify the entries the old one "
    "signed; only if the key is lost for good, move the file away so that a new one is made)"
)


def site_signing_key(work_dir: Path) -> Ed25519PrivateKey:
    """The site's ledger signing key, created on first use; (re)writes the public key file.

    Raises :class:`KeyFileError` when the key file exists but is unreadable or not an Ed25519
    private key in PEM (it is never replaced silently: the ledger's signatures depend on it).
    """
    path = private_key_path(work_dir)
    if not path.exists():
        try:
            _create_private_key(path)
        except OSError as error:
            raise KeyFileError(
                f"cannot create the ledger signing key {path} ({error.strerror or error}): run as "
                "the site's user or fix the permissions of the site's work folder"
            ) from None
    data = _read_key_file(path, "ledger signing key", PRIVATE_KEY_FIX)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyFileError(
            f"{path} is not a PEM private key ({_first_line(error)}): {PRIVATE_KEY_FIX}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key: {PRIVATE_KEY_FIX}")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_if_changed(public_key_path(work_dir), public)
    return key


def site_public_key(work_dir: Path) -> Ed25519PublicKey:
    """The public half of the site's ledger key, read from ``<work dir>/ledger_signing.pub``."""
    path = public_key_path(work_dir)
    if not path.exists():
        raise KeyFileError(
            f"no ledger public key at {path}: the site has not written its ledger yet, or "
            "give a copy of its public key (scripts/ledger.py public_key=...)"
        )
    return load_public_key(path)


PUBLIC_KEY_FIX = (
    "give a copy of the site's ledger_signing.pub (PEM) that you trust, e.g. "
    "scripts/ledger.py public_key=path/to/ledger_signing.pub"
)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; :class:`KeyFileError` (one line) otherwise."""
    data = _read_key_file(path, "ledger public key", PUBLIC_KEY_FIX)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyFileError(
            f"{path} is not a PEM public key ({_first_line(error)}): {PUBLIC_KEY_FIX}"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key: {PUBLIC_KEY_FIX}")
    return key


def _first_line(error: Exception) -> str:
    """An exception's message on one line (cryptography's can span several)."""
    return " ".join(str(error).split())[:200] or type(error).__name__
