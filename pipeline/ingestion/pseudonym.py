"""Content hashes, the site secret and the keyed pseudonyms derived from it.

Pseudonyms are HMAC-SHA256 digests keyed with the site's secret, so nobody without the
secret can link a key back to a file or a patient id by hashing guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("fedrad.pseudonym")

KEY_CHARS = 20  # hex characters kept from each HMAC digest (80 bits)
SECRET_BYTES = 32
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_secret(path: Path) -> bool:
    """Create a random secret (hex) at ``path`` if there is none; never overwrite one.

    Returns True when a new secret was written.
    """
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
    log.warning("created a new site secret at %s: keep it; pseudonyms depend on it", path)
    return True


def load_secret(path: Path) -> bytes:
    """Read the site secret; fail clearly when it is missing or too short."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"site secret {path} not found: create it with scripts/prepare_demo.py (demo) "
            "or restore the site's backup; a new secret changes every pseudonym"
        )
    secret = path.read_text().strip().encode()
    if len(secret) < 32:
        raise ValueError(f"site secret {path} is too short ({len(secret)} chars, need >= 32)")
    return secret


def keyed_hash(secret: bytes, domain: str, value: str) -> str:
    """Truncated HMAC-SHA256 of ``value`` under ``secret``, separated by ``domain``."""
    message = f"{domain}\0{value}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:KEY_CHARS]


def image_key(secret: bytes, content_sha256: str) -> str:
    """Pseudonymous id of an image: keyed hash of its content hash."""
    return keyed_hash(secret, "image", content_sha256)


def patient_key(secret: bytes, patient_id: str) -> str:
    """Pseudonymous id of a patient: keyed hash of the site's patient id."""
    return keyed_hash(secret, "patient", patient_id)
