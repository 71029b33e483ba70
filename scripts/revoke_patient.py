"""Revoke a patient's consent at this site: their images leave the cache and every later round.

For a site's data owner. Required: +site=<your site file> and patient_id=<the hospital's PatientID>.

    python scripts/revoke_patient.py +site=demo_site1 patient_id=S1MRN00012

The PatientID is mapped to the site's pseudonymous key and never stored. Prints the
rounds that trained on the patient and the models that include those rounds; the
revocation is entered in the site's ledger (see scripts/ledger.py).
"""

from __future__ import annotations

from pipeline.cli import answer_help, one_line_errors

answer_help(__doc__)  # before the training stack is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.deployment.site import configured_site  # noqa: E402
from pipeline.governance.revocation import revoke_patient  # noqa: E402
from pipeline.governance.site_ledger import LedgerCorrupted  # noqa: E402


@hydra.main(config_path="../conf", config_name="revoke_patient", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors(False, LedgerCorrupted):
        print(revoke_patient(configured_site(cfg), str(cfg.patient_id)).text())


if __name__ == "__main__":
    main()
