r"""Create the federation's key material and print how to register each site.

For the coordinator's operator, once per federation. Required: nothing for the demo; deployment.hostnames=[<coordinator host>] for real machines.

    python scripts/make_certs.py                                          # 3 demo sites, localhost
    python scripts/make_certs.py deployment.hostnames=[coordinator.example.org] \
        deployment.sites=[hospital_a,hospital_b,hospital_c]

Writes deployment.certs_dir (default ~/.fedrad/certs, outside the repository; private keys
mode 0600): ca.crt (give to every site), ca.key (keep offline), coordinator.crt/.key (the
SuperLink's), sites/<name>.key (give to that site only) and sites/<name>.pub (registered on the
coordinator). Existing files are kept; delete them to rotate.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import answer_help

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.deployment.certificates import make_federation_certs  # noqa: E402
from pipeline.deployment.coordinator import CoordinatorState, write_cli_connection  # noqa: E402
from pipeline.deployment.flower_cli import register_command  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    dep = cfg.deployment
    certs, keys = make_federation_certs(dep.certs_dir, list(dep.hostnames), list(dep.sites))
    write_cli_connection(dep)
    flwr_home = CoordinatorState.under(dep.state_dir).flwr_home.resolve()
    print(f"coordinator: {certs.cert} (CA {certs.ca_cert}); keep {Path(dep.certs_dir) / 'ca.key'} offline")
    print("with the coordinator running, register each site once on the coordinator machine:")
    for site, site_keys in keys.items():
        print(register_command(flwr_home, site_keys.public_key.resolve(), site))


if __name__ == "__main__":
    main()
