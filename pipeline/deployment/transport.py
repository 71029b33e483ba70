"""TLS and SuperNode authentication by default; plain text only when asked, loudly."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.deployment.certificates import CoordinatorCerts

log = logging.getLogger("fedrad.deployment")

INSECURE_WARNING = (
    "deployment.insecure=true: %s runs WITHOUT TLS and WITHOUT SuperNode authentication. "
    "Anyone on the network can read the model updates and join the federation. Use this "
    "only on an isolated test machine."
)


def warn_insecure(role: str) -> None:
    log.warning(INSECURE_WARNING, role)


def require_files(paths: list[Path], fix: str) -> None:
    """Fail early, naming every missing file and the command that makes it."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: {fix}")


def superlink_security_args(dep: DictConfig) -> list[str]:
    """TLS files and SuperNode authentication for ``flower-superlink``."""
    if dep.insecure:
        warn_insecure("the coordinator")
        return ["--insecure"]
    certs = CoordinatorCerts.under(dep.certs_dir)
    require_files(
        [certs.ca_cert, certs.cert, certs.key],
        "run `python scripts/make_certs.py` on the coordinator first",
    )
    return [
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.cert),
        "--ssl-keyfile",
        str(certs.key),
        "--enable-supernode-auth",
    ]


def supernode_security_args(dep: DictConfig) -> list[str]:
    """The CA to verify the coordinator with and the site's authentication key."""
    if dep.insecure:
        warn_insecure("this site")
        return ["--insecure"]
    root, key = Path(dep.root_certificate), Path(dep.private_key)
    require_files(
        [root, key],
        "copy ca.crt and this site's private key from the coordinator's "
        "`python scripts/make_certs.py` output (set deployment.root_certificate / "
        "deployment.private_key)",
    )
    return ["--root-certificates", str(root), "--auth-supernode-private-key", str(key)]
