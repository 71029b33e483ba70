"""The federation's key material, made with the ``cryptography`` package.

* a federation CA (``ca.crt``/``ca.key``): the coordinator keeps ``ca.key`` offline; every
  site receives ``ca.crt`` to verify the coordinator;
* the coordinator's TLS certificate (``coordinator.crt``/``coordinator.key``) for
  127.0.0.1, localhost and the configured hostnames;
* one SuperNode authentication key pair per site (``sites/<name>.key`` stays at the site,
  ``sites/<name>.pub`` is registered with the coordinator).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest validity current TLS clients accept for a server certificate


@dataclass(frozen=True)
class CoordinatorCerts:
    """The files the coordinator's SuperLink serves TLS with."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def under(cls, certs_dir: str | Path) -> "CoordinatorCerts":
        root = Path(certs_dir)
        return cls(root / "ca.crt", root / "coordinator.crt", root / "coordinator.key")


@dataclass(frozen=True)
class SiteKeys:
    """A site's SuperNode authentication key pair (OpenSSH format, NIST P-384)."""

    private_key: Path
    public_key: Path

    @classmethod
    def under(cls, certs_dir: str | Path, site: str) -> "SiteKeys":
        root = Path(certs_dir) / "sites"
        return cls(root / f"{site}.key", root / f"{site}.pub")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data``; a private key is created readable by its owner only (0600) from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    if private:
        os.chmod(path, 0o600)  # a file that existed before keeps its mode through os.open


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrad federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=VALID_DAYS)
    )


def make_ca(ca_cert: Path, ca_key: Path, name: str = "fedrad federation CA") -> None:
    """A self-signed certificate authority for the federation."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder).sign(key, hashes.SHA384())
    _write(ca_key, _pem_key(key), private=True)
    _write(ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _subject_alt_names(hostnames: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hostnames]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(certs: CoordinatorCerts, ca_key: Path, hostnames: list[str]) -> None:
    """The coordinator's TLS certificate, signed by the federation CA."""
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    # The CA key is the one make_ca wrote (EC); a key that cannot sign fails in sign() below.
    loaded = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    signer = cast(CertificateIssuerPrivateKeyTypes, loaded)
    issuer_key = cast(CertificateIssuerPublicKeyTypes, ca.public_key())
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else "localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alt_names(hostnames), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
    )
    cert = _validity(builder).sign(signer, hashes.SHA384())
    _write(certs.key, _pem_key(key), private=True)
    _write(certs.cert, cert.public_bytes(serialization.Encoding.PEM))


def make_site_keys(keys: SiteKeys, comment: str) -> None:
    """A SuperNode authentication key pair in the OpenSSH format Flower reads."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(keys.private_key, private, private=True)
    _write(keys.public_key, public + f" {comment}\n".encode())


def make_federation_certs(
    certs_dir: str | Path, hostnames: list[str], sites: list[str], overwrite: bool = False
) -> tuple[CoordinatorCerts, dict[str, SiteKeys]]:
    """CA, coordinator certificate and site keys under ``certs_dir``.

    Existing files are kept unless ``overwrite``: re-running never silently replaces a CA
    whose certificate the sites already trust, nor a key already registered.
    """
    root = Path(certs_dir)
    certs = CoordinatorCerts.under(root)
    ca_key = root / "ca.key"
    new_ca = overwrite or not certs.ca_cert.is_file()
    if new_ca:
        make_ca(certs.ca_cert, ca_key)
    if new_ca or not certs.cert.is_file():
        make_server_cert(certs, ca_key, hostnames)
    keys = {site: SiteKeys.under(root, site) for site in sites}
    for site, site_keys in keys.items():
        if overwrite or not site_keys.private_key.is_file():
            make_site_keys(site_keys, comment=f"fedrad-{site}")
    return certs, keys
