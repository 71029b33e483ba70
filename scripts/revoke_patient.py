"""Revoke a patient's consent at this site: their images leave the cache and every later round.

    python scripts/revoke_patient.py +site=demo_site1 patient_id=S1MRN00012

The PatientID is mapped to the site's pseudonymous key and never stored. Prints the
rounds that trained on the patient and the models that include those rounds; the
revocation is entered in the site's ledger (see scripts/ledger.py).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.deployment.site import configured_site
from pipeline.governance.revocation import revoke_patient


@hydra.main(config_path="../conf", config_name="revoke_patient", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(revoke_patient(configured_site(cfg), str(cfg.patient_id)).text())


if __name__ == "__main__":
    main()
