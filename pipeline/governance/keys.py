"""A site's ledger signing key: an Ed25519 key pair made on first use, kept on the site's disk.

``<work dir>/private/ledger_signing.key`` (PKCS#8 PEM, mode 0600) never leaves the site;
``<work dir>/ledger_signing.pub`` (PEM) is what anyone verifying the site's ledger needs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.files import write_if_changed

PRIVATE_KEY_NAME = "ledger_signing.key"
PUBLIC_KEY_NAME = "ledger_signing.pub"


def private_key_path(work_dir: Path) -> Path:
    return Path(work_dir) / "private" / PRIVATE_KEY_NAME


def public_key_path(work_dir: Path) -> Path:
    return Path(work_dir) / PUBLIC_KEY_NAME


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


def site_signing_key(work_dir: Path) -> Ed25519PrivateKey:
    """The site's ledger signing key, created on first use; (re)writes the public key file."""
    path = private_key_path(work_dir)
    if not path.is_file():
        _create_private_key(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key: move it away to make a new one")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_if_changed(public_key_path(work_dir), public)
    return key


def site_public_key(work_dir: Path) -> Ed25519PublicKey:
    """The public half of the site's ledger key, read from ``<work dir>/ledger_signing.pub``."""
    path = public_key_path(work_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no ledger public key at {path}: the site has not written its ledger yet, or "
            "give a copy of its public key (scripts/ledger.py public_key=...)"
        )
    return load_public_key(path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
